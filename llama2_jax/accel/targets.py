"""`--target` values: "tpu:NAME" (llama2_jax.accel.tpu) or "gpu:NAME" (llama2_jax.accel.gpu), and their
compile-only devices."""

from __future__ import annotations

from typing import Union

import jax

from llama2_jax.accel import gpu, tpu

Target = Union[tpu.TpuSlice, gpu.GpuSystem]


def parse_target(target: str) -> Target:
    """ValueError (one line, listing the known names) for anything but tpu:SLICE or gpu:SYSTEM."""
    platform, _, name = target.partition(":")
    if platform == "tpu" and name:
        return tpu.tpu_slice(name)
    if platform == "gpu" and name:
        return gpu.gpu_system(name)
    raise ValueError(f"unknown target {target!r}: expected tpu:NAME ({', '.join(tpu.SLICES)}) or gpu:NAME "
                     f"({', '.join(gpu.SYSTEMS)})")


def compile_only_devices(target: Target) -> list[jax.Device]:
    if isinstance(target, gpu.GpuSystem):
        return gpu.compile_only_devices(target)
    return tpu.compile_only_devices(target)


def is_tpu(target: Target) -> bool:
    return isinstance(target, tpu.TpuSlice)
