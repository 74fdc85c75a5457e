"""Inference: sampling, the KV-cache decoder and the host APIs over it.

  sampling       greedy / temperature / Meta's top-p, and the checks of their arguments
  decode         decode state, the cached forward, the compiled loop
  slots          decode slots: prefill / insert / generate_step (continuous batching)
  slot_sampler   a list of prompts through decode slots (the RLHF trainers' rollouts)
  generate       Meta's host API: generate, text_completion, chat_completion, streaming
  scoring        batched log-likelihood of continuations (the lm-eval backend's numerics)
  reward_scores  reward-model scores of dialogs or token lists on the host
"""
