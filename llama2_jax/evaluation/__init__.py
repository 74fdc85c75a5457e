"""Evaluation: lm-evaluation-harness and reward-model accuracy.

  harness          evaluate_tasks (lm-eval in process) and flat_metrics
  lm_eval_backend  the `llama2_jax` lm-eval model (TemplateLM)
  reward_model     reward-model accuracy per rating level, margins, score histogram
  recipe_report    the recipe's per-stage figures, REPORT.md and plots
  tasks            task YAMLs for local files (PIQA, text perplexity)

Named `evaluation`, not `eval`, so that `from llama2_jax import evaluation` never shadows the builtin.
"""
