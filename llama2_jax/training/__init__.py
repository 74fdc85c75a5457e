"""The trainer layer that every program in train/ runs on.

  state         TrainState, the optimizer, the jitted train/eval steps
  losses        every loss (next-token, reward ranking with margins, DPO, PPO, GRPO, RLOO)
  loop          the one training loop: step -> metrics/progress/TensorBoard/W&B -> evals -> checkpoint
  checkpointer  trainer checkpoints (Orbax steps) and the workdir's model description
  checks        config-field checks run before anything compiles (ConfigError)
  hosts         multi-host start-up and host <-> global arrays
  task_evals    lm-eval tasks during training
  workdir_lock  one run per workdir
  rlhf_setup    reward models and prompts for the RL trainers
  perf          FLOPs per token and MFU
  common        the shared trainer set-up (flags, model config, tokenizer, state init, the SFT run)
"""
