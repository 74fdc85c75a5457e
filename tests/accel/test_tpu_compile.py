"""The TPU compiler in the tests: a tiny model's train step, LoRA step and decode step compiled by libtpu for the
compile-only devices of a v5e-4 slice (no TPU attached), with the "xla" and "splash" attention kernels; the per-chip
HBM figure is positive and below the chip's. Skipped, with the reason, where libtpu is not installed (the tpu-aot
extra).

Covers llama2_jax.accel.aot and llama2_jax.accel.tpu."""

import pytest

from llama2_jax.accel import aot
from llama2_jax.accel import tpu as accel_tpu
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig

LIBTPU_PROBLEM = accel_tpu.libtpu_problem()
needs_libtpu = pytest.mark.skipif(LIBTPU_PROBLEM is not None, reason=str(LIBTPU_PROBLEM))

SLICE = "v5e-4"  # 4 chips of 16 GiB, one host
# head_dim 128 (the TPU lane width splash tiles by); two KV heads so that the heads split over tensor=2
TINY = LlamaConfig(vocab_size=256, dim=256, n_layers=2, n_heads=2, n_kv_heads=2, multiple_of=64, max_seq_len=256,
                   scan_layers=True, remat_policy="minimal")


def tpu_mesh():
    """data=1, fsdp=2, tensor=2 over the slice's compile-only devices: batch and parameters over fsdp, heads over
    tensor (splash's shard_map splits both)."""
    return sh.make_mesh(1, 2, 2, devices=accel_tpu.compile_only_devices(accel_tpu.tpu_slice(SLICE)))


def assert_fits_the_chip(figure: aot.MemoryFigure):
    hbm = accel_tpu.tpu_slice(SLICE).hbm_gib * aot.GIB
    assert figure.error is None, figure.error
    assert 0 < figure.total < hbm, figure.describe()
    assert figure.argument > 0 and figure.compile_s > 0


@needs_libtpu
@pytest.mark.slow  # ~6 compiles by the TPU compiler, 5-15 s each on two busy cores
@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_train_lora_and_decode_steps_compile_for_a_tpu_slice(impl):
    mesh = tpu_mesh()
    cfg = TINY.replace(attention_impl=impl, attention_block_size=128, attention_kv_block_size=128)
    step, args = aot.abstract_train_step("pretrain", cfg, mesh, seq_len=256, batch_per_device=1)
    lowered = step.lower(*args)
    # splash is a Mosaic kernel in the TPU program; the reference is plain XLA
    assert ("tpu_custom_call" in lowered.as_text()) == (impl == "splash")
    assert_fits_the_chip(aot.compile_memory(step, *args))
    assert_fits_the_chip(aot.compile_train_step("lora", cfg, mesh, seq_len=256, batch_per_device=1, lora_rank=8))
    # decoding attends over the KV cache (attention.cached_attention) whatever the training kernel
    assert_fits_the_chip(aot.compile_decode(cfg, mesh, batch_per_device=1, prompt_len=32, max_gen_len=32))


@needs_libtpu
def test_a_program_larger_than_the_chip_is_refused_with_its_figure():
    """7B's full training state alone is 16 bytes x 6.7e9 / 4 = 25 GiB per v5e chip: the compiler refuses it, and
    the figure says so instead of raising. Two layers keep the compile short."""
    cfg = LlamaConfig(n_layers=2, dim=4096 * 4, n_heads=128, n_kv_heads=128, scan_layers=True,
                      remat_policy="minimal", max_seq_len=256)
    figure = aot.compile_train_step("pretrain", cfg, tpu_mesh(), seq_len=256, batch_per_device=1)
    assert figure.error and "RESOURCE_EXHAUSTED" in figure.error and "\n" not in figure.error


def test_unknown_slices_and_targets_are_one_line_errors_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown TPU slice 'v5p-7'; known: v4-8, .*v5p-8, .*v6e-256$"):
        accel_tpu.tpu_slice("v5p-7")
    with pytest.raises(ValueError, match=r"^unknown target 'gpu:h100-8': expected tpu:NAME with NAME one of v4-8, "):
        accel_tpu.parse_target("gpu:h100-8")
    v5p = accel_tpu.parse_target("tpu:v5p-64")
    assert (v5p.chips, v5p.topology_name, v5p.generation.chip_config) == (32, "v5:2x4x4", "megacore")
    assert v5p.hbm_gib == 95.74  # the compiler's available HBM on a v5p chip
    v5e = accel_tpu.tpu_slice("v5e-8")
    assert (v5e.chips, v5e.topology_name, v5e.chips_per_host_bounds) == (8, "v5e:2x4", (2, 4, 1))  # one 8-chip host


@needs_libtpu
def test_compile_only_devices_match_the_slice():
    devices = accel_tpu.compile_only_devices(accel_tpu.tpu_slice("v5p-16"))
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"TPU v5"}
    assert len({d.process_index for d in devices}) == 2  # two hosts of four chips
