"""Checkpoints: reading and writing weights, and converting them.

  params_io  params-only checkpoints (load_params, save_params, LoRA adapters), trainer workdirs read as models
  convert    Hugging Face and Meta checkpoints <-> ours (the RoPE permutation lives here only)
  peft       PEFT LoRA adapters <-> ours
  storage    writing under faults: disk-full detection, no half-written directories
"""
