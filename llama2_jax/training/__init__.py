"""The trainer layer that every program in train/ runs on.

  setup          `setup(config, workdir, task) -> Run`: every check in one fixed order, then the workdir's files
  run_dir        a workdir belongs to one run: its checks (run.json), the lock, the files written
  tokenizer_setup  the run's tokenizer: given, init_from's, a resumed run's, or trained on the data
  model_config   the model: config.model, or init_from's architecture with config.model's numerics
  checks         config-field checks run before anything compiles (ConfigError)
  initial_state  the optimizer factory (`make_tx`) and the initial state (`init_state`: LoRA or full, chosen once)
  lora_run       LoRA adapters on a frozen base
  state          TrainState, LoopState, Trainable, the optimizer, the jitted train/eval steps
  losses         every loss (next-token, reward ranking with margins, DPO, PPO, GRPO, RLOO)
  loop           the one training loop (a step is an optimizer step or an RL iteration) and `TrainResult`
  checkpointer   trainer checkpoints (Orbax steps; several models as one step)
  tracking       metrics.jsonl, TensorBoard, W&B; profiler traces
  sft_run        next-token training and the SFT run (train.sft, and the rounds below)
  rounds         generate with the policy, fine-tune on it: rejection sampling, GAtt, context distillation
  rlhf_setup     reward models and prompts for the RL trainers
  outputs        the one JSON / JSONL writer
  hosts          multi-host start-up and host <-> global arrays
  task_evals     lm-eval tasks during training
  workdir_lock   one run per workdir
  perf           FLOPs per token and MFU
"""
