"""XLA's GPU compiler without a GPU: a tiny model's train step compiled for the compile-only devices of one 8-GPU
H100 node (llama2_jax.accel.gpu). Skipped, with the reason, where the CUDA PJRT plugin is not installed (the gpu-aot
extra, which CI leaves out: installed, it logs to stderr at every JAX start-up on a machine without GPUs).

Covers llama2_jax.accel.gpu and llama2_jax.accel.targets."""

import pytest

from llama2_jax.accel import aot, gpu, targets
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig

needs_plugin = pytest.mark.skipif(gpu.cuda_plugin_problem() is not None, reason=str(gpu.cuda_plugin_problem()))


def test_gpu_targets_parse_and_unknown_ones_are_one_line_errors():
    h100 = targets.parse_target("gpu:h100-64")
    assert (h100.chips, h100.topology, round(h100.hbm_gib, 1)) == (64, "1x8x8", 79.6)
    assert targets.parse_target("gpu:a100-1").topology == "1x1x1"
    with pytest.raises(ValueError, match=r"^unknown GPU system 'h200-8'; known: h100-1, .*a100-256$"):
        targets.parse_target("gpu:h200-8")
    with pytest.raises(ValueError, match=r"^unknown target 'cuda:h100-8': expected tpu:NAME \(v4-8, .*\) or gpu:NAME"):
        targets.parse_target("cuda:h100-8")


@needs_plugin
@pytest.mark.slow  # two compiles by XLA's GPU compiler
def test_train_and_lora_steps_compile_for_an_h100_node():
    devices = targets.compile_only_devices(targets.parse_target("gpu:h100-8"))
    assert len(devices) == 8 and devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    mesh = sh.make_mesh(1, 8, 1, devices=devices)
    cfg = LlamaConfig(vocab_size=256, dim=256, n_layers=2, n_heads=2, n_kv_heads=2, multiple_of=64, max_seq_len=256,
                      scan_layers=True, remat_policy="minimal")
    for task in ("pretrain", "lora"):
        figure = aot.compile_train_step(task, cfg, mesh, seq_len=256, batch_per_device=1)
        assert figure.error is None and 0 < figure.total < gpu.MODELS["h100"].memory_bytes, figure.describe()
