"""Accelerators without the hardware: compile-only devices of a named TPU slice and the real train steps compiled
for them, so per-chip memory comes from the TPU compiler itself (libtpu, the `tpu-aot` extra) on any machine.

  tpu       the known slices (v4, v5e, v5p, v6e: topology, chip config, host bounds, HBM per chip) and
            compile_only_devices(slice); one-line errors for unknown names or a missing libtpu
  aot       every trainer kind's step (pretraining, SFT, LoRA, RM, DPO, PPO policy/value) and the decode step lowered
            on abstract, sharded inputs and compiled for a mesh of those devices: per-chip memory and compile time
"""
