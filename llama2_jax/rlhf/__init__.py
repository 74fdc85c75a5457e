"""RLHF (Touvron et al. 2023, section 3.2.3 and 4.2.4): the pieces that are not a program.

  formulas         the piecewise reward, whitening, per-token KL, GAE, clipped PPO objectives, best-of-K
  rollout          PPO's rollout and experience phases as pure functions
  group            critic-free advantages from G completions per prompt: GRPO's group normalisation, RLOO's
                   leave-one-out baseline
  reward_functions rewards from Python functions named in the config, with weights and counted failures; the
                   Llama 2 reward-model pair from its scores
  context_distill  targeted safety context distillation: preprompts, keep rule, records
  annotators       the annotator interface (pairs, labels, rating levels), the gold reward-model annotator
  label_files      the file annotator: export pairs, import people's labels (resumable)
  pairs            two answers per prompt from two model variants / temperatures: a round's pairs to label
  pool             the rejection-sampling pool across iterations (best complete answer per prompt, rescoring)
"""
