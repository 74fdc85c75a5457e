"""Throughput accounting (llama2_jax.training.perf): each chip's peak bf16 TFLOP/s found by its device kind, no MFU
for chips without a figure (CPUs included) rather than a wrong one, and MFU = tokens/s x FLOPs/token over the chips'
total peak, checked by hand."""

import types

import pytest

from llama2_jax.training import perf


def device(kind: str):
    return types.SimpleNamespace(device_kind=kind)


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v4", 275.0),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_tflops_by_device_kind(kind, tflops):
    assert perf.peak_tflops(device(kind)) == tflops


def test_the_cpu_this_runs_on_has_no_peak_and_no_mfu():
    assert perf.peak_tflops() is None
    assert perf.mfu(1000.0, 6e9, 8) is None


def test_mfu_by_hand():
    # 1000 tokens/s x 6e9 FLOPs/token on 8 H100s (989 TFLOP/s each): 6e12 / 7.912e15
    assert perf.mfu(1000.0, 6e9, 8, device("NVIDIA H100 80GB HBM3")) == pytest.approx(6e12 / 7.912e15, rel=1e-12)
    # a v5e-4 slice at 40% of its peak
    tokens_per_sec = 0.4 * 4 * 197e12 / 1.2e10
    assert perf.mfu(tokens_per_sec, 1.2e10, 4, device("TPU v5 lite")) == pytest.approx(0.4, rel=1e-12)
    assert perf.mfu(1000.0, 6e9, 0, device("TPU v4")) is None  # no chips: no figure
