"""Throughput accounting shared by the trainers' progress bars and the benchmarks: FLOPs per token and MFU.

FLOPs per token = 6·N_matmul + 12·L·d·T (`LlamaConfig.flops_per_token`). Peak dense bfloat16 TFLOP/s per chip below;
a chip not in the table gets no MFU (None) rather than a wrong one.
"""

from __future__ import annotations

from typing import Optional

import jax

# (substring of jax.Device.device_kind, peak bf16 dense TFLOP/s per chip). Order matters: first match wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),  # v5e reports itself as "TPU v5 lite"
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


def peak_tflops(device: Optional[jax.Device] = None) -> Optional[float]:
    """Peak bf16 TFLOP/s of one chip, or None for chips we have no figure for (CPUs included)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return tflops
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, num_chips: int,
        device: Optional[jax.Device] = None) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None where the chip's peak is unknown."""
    peak = peak_tflops(device)
    if peak is None or num_chips <= 0:
        return None
    return tokens_per_sec * flops_per_token / (num_chips * peak * 1e12)
