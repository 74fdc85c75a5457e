"""Fast checks of the benchmarks (the timed runs and the big AOT compiles are not tests: see benchmarks/RESULTS.md)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import attention as attention_bench  # noqa: E402
import generate as generate_bench  # noqa: E402
import memory  # noqa: E402  (imports llama2_jax and llama2_jax.training.state only; the XLA device flag is set by conftest)
import train_step  # noqa: E402

from llama2_jax.model.config import get_config  # noqa: E402

TINY = ["--dim=64", "--n_layers=1", "--n_heads=4", "--n_kv_heads=2", "--ffn=96", "--vocab=128", "--seq=16",
        "--batch=8", "--steps=2", "--warmup=1", "--devices=1"]
FIELDS = ("device=", "side=ours", "dim64/L1/H4/KV2/F96/V128", "batch=8", "seq=16", "tok/s=", "TFLOP/s=", "MFU=",
          "peak_mem=", "loss=")


def test_train_step_prints_one_line_with_every_field(capsys):
    train_step.main(TINY)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for field in FIELDS:
        assert field in lines[0], (field, lines[0])
    assert "MFU=n/a" in lines[0]  # CPUs have no entry in the peak table
    loss = float(re.search(r"loss=([0-9.]+)", lines[0]).group(1))
    assert 0.0 < loss < 10.0  # ln(128) = 4.85 at init: the step ran on real numbers


def test_train_step_plain_causal_and_scan_remat_variants(capsys):
    train_step.main(TINY + ["--segments=none", "--scan", "--remat=minimal", "--dtype=bfloat16"])
    line = capsys.readouterr().out.strip()
    assert "segments=none" in line and "scan=1" in line and "remat=minimal" in line and "dtype=bfloat16" in line


def test_decode_benchmark_times_an_xla_option_variant_in_the_same_run(capsys):
    generate_bench.main(["--shape=15m", "--n_layers=1", "--batch=1", "--new_tokens=4", "--repeats=1", "--no_hf",
                         "--xla_option=xla_cpu_multi_thread_eigen=false"])
    line = capsys.readouterr().out.strip()
    assert re.search(r" ours=[0-9.]+ tok/s ours_opts=[0-9.]+ tok/s opts=xla_cpu_multi_thread_eigen=false", line), line


def test_xla_options_parse_to_typed_values():
    options = generate_bench.parse_xla_options(["a=true", "b=False", "c=32", "d=FUSION,WHILE", "e="])
    assert options == {"a": True, "b": False, "c": 32, "d": "FUSION,WHILE", "e": ""}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        generate_bench.parse_xla_options(["no_value"])


def test_synthetic_batch_is_the_trainers_format():
    batch = train_step.synthetic_batch(2, 5, 100, "packed")
    assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
    assert (batch["inputs"][:, 1:] == batch["targets"][:, :-1]).all()
    assert train_step.synthetic_batch(2, 5, 100, "none")["segment_ids"] is None


def test_benchmark_import_path_is_free_of_data_dependencies():
    """grain, ml_collections and tensorflow_datasets must not load with the benchmarks (the GPU image lacks them)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import train_step, memory; "
            "bad = [m for m in ('grain', 'ml_collections', 'tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_memory_formula_state_is_16_bytes_per_param_over_devices():
    cfg = get_config("7b", scan_layers=True)
    f = memory.memory_formula(cfg, seq=4096, batch_per_device=1, n_devices=8, remat="dots_no_batch")
    state = f["params"] + f["grads"] + f["adam"]
    assert state == pytest.approx(16 * 6_738_415_616 / 8)
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    assert 20 * memory.GIB < f["total"] < 80 * memory.GIB


def test_attention_benchmark_prints_both_kernels_in_one_line(capsys):
    attention_bench.main(["--seq=32", "--heads=2", "--kv_heads=1", "--head_dim=8", "--block=8", "--repeats=1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(r"xla=[0-9.]+ ms chunked=[0-9.]+ ms ratio=[0-9.]+x temp xla=\d+ MiB chunked=\d+ MiB", lines[0])


def test_memory_formula_chunked_attention_sits_between_xla_and_flash():
    cfg = get_config("7b", scan_layers=True, attention_block_size=512)
    totals = [memory.memory_formula(cfg, 4096, 1, 1, "minimal", attention)["total"]
              for attention in ("xla", "chunked", "cudnn")]
    assert totals[0] > totals[1] > totals[2]
    # one block's float32 scores, probabilities and their gradients: 8 bytes x N x block x T
    assert totals[1] - totals[2] == pytest.approx(8 * 32 * 512 * 4096)


def test_memory_formula_orders_remat_policies():
    cfg = get_config("13b", scan_layers=True)
    totals = [memory.memory_formula(cfg, 4096, 1, 8, policy)["total"] for policy in memory.POLICY_ORDER]
    assert totals == sorted(totals, reverse=True)  # none > dots > dots_no_batch > minimal
    flash = memory.memory_formula(cfg, 4096, 1, 8, "minimal", attention="cudnn")["total"]
    assert flash < totals[-1]  # no [T, T] tensors with fused attention


def test_pick_policy_takes_the_least_recomputing_policy_that_fits():
    cfg = get_config("70b", scan_layers=True)
    assert memory.pick_policy(cfg, 4096, 1, 64, 80 * memory.GIB) == "minimal"
    assert memory.pick_policy(cfg, 128, 1, 64, 80 * memory.GIB) == "none"


@pytest.mark.slow
def test_gpu_script_plumbing_runs_on_cpu_with_tiny_shapes(tmp_path):
    """benchmarks/gpu.sh end to end with tiny shapes and XLA attention: every part prints its result line (the GPU
    itself is never available to CI; this guards the script's parsing, timeouts and retries)."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), BATCH="2", ATTENTION="xla", JAX_PLATFORMS="cpu",
               XLA_FLAGS="",  # one CPU device, as on a one-GPU machine
               TRAIN_ARGS="--dim=64 --n_layers=2 --n_heads=4 --n_kv_heads=2 --ffn=128 --vocab=256 --seq=32 "
                          "--steps=2 --warmup=1",
               DECODE_ARGS="--shape=15m --n_layers=1 --batch=1 --new_tokens=8 --repeats=1")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("=== GPU table", 1)[1]
    for expected in ("side=ours", "segments=packed", "segments=none", "side=hf-eager_bf16", "side=hf-compile_bf16",
                     "model=dim288/L1", "ratio="):
        assert expected in table, (expected, table)
    assert not re.search(r"^(FAILED|TIMEOUT|NO RESULT|SKIPPED)", table, re.M), table


def test_lora_step_prints_one_comparable_line(capsys):
    import lora_step

    line = lora_step.main(["--dim=32", "--n_layers=1", "--n_heads=4", "--n_kv_heads=2", "--ffn=64", "--vocab=128",
                           "--seq=16", "--steps=2", "--warmup=1", "--lora_rank=4", "--param_dtype=bfloat16"])
    assert capsys.readouterr().out.strip() == line
    fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
    full_ms, lora_ms, ratio = float(fields["full_ms"]), float(fields["lora_ms"]), float(fields["ratio"])
    assert full_ms > 0 and lora_ms > 0 and ratio == pytest.approx(lora_ms / full_ms, rel=0.02, abs=2e-3)
    # rank 4 on the seven kernels of one block: a [in, 4] + b [4, out] each (dim 32, 4 + 2 + 2 + 4 heads of 8, F 64)
    assert fields["trainable"] == f"{4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32)):,}"
    assert fields["base_param_dtype"] == "bfloat16" and np_isfinite(fields["lora_loss"])


def np_isfinite(text: str) -> bool:
    import math

    return math.isfinite(float(text))


def test_rollout_benchmark_prints_one_line_with_both_engines(capsys):
    import rollout as rollout_bench  # benchmarks/rollout.py (benchmarks/ is on sys.path above)

    rollout_bench.main(["--shape=15m", "--n_layers=1", "--prompts=3", "--samples=2", "--slots=2", "--prompt_len=4,8",
                        "--gen_len=2,6", "--repeats=1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.search(r"prompts=3x2 slots=2 .* tokens=\d+ batch=[0-9.]+ tok/s slots=[0-9.]+ tok/s ratio=[0-9.]+x "
                     r".* load=[0-9.]+ cpus=\d+$", lines[0]), lines[0]
