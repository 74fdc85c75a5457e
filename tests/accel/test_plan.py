"""The TPU planner (`python -m llama2_jax.plan`): its candidates, its cost order, one-line errors, and a run on a tiny
model and a small slice whose chosen overrides are real config fields.

Covers llama2_jax.accel.planner, llama2_jax.accel.estimate and llama2_jax.cli.plan."""

import pytest

from llama2_jax.accel import estimate, planner
from llama2_jax.accel import tpu as accel_tpu
from llama2_jax.cli import plan as plan_cli
from llama2_jax.model.config import get_config

needs_libtpu = pytest.mark.skipif(accel_tpu.libtpu_problem() is not None, reason=str(accel_tpu.libtpu_problem()))


def test_candidates_cover_the_slice_and_the_batch_cheapest_first():
    cfg = get_config("70b", scan_layers=True, attention_impl="splash")
    target = accel_tpu.tpu_slice("v5p-64")
    candidates = planner.enumerate_candidates(cfg, "pretrain", target, 4096, 1024)
    assert candidates
    for c in candidates:
        data, fsdp, tensor = c.mesh
        assert data * fsdp * tensor == target.chips and cfg.n_kv_heads % tensor == 0
        assert c.rows_per_shard * data * fsdp * c.grad_accum_steps == 1024
    costs = [c.seconds["total"] for c in candidates]
    assert costs == sorted(costs)
    by_remat = {c.remat: c.seconds["total"] for c in candidates if c.mesh == (1, 32, 1) and c.rows_per_shard == 1}
    assert by_remat["none"] < by_remat["dots_no_batch"] < by_remat["minimal"]  # recomputation costs time
    assert by_remat["minimal"] / by_remat["none"] == pytest.approx(4 / 3, rel=0.05)  # a third of the step again


def test_step_seconds_compute_term_is_the_closed_form_flops():
    cfg = get_config("7b")
    s = estimate.step_seconds(cfg, 4096, 8, (1, 8, 1), 1, "none", peak_flops=1e15, ici_bytes_per_s=1e11, mfu=0.5)
    assert s["compute"] == pytest.approx(8 * 4096 * cfg.flops_per_token(4096) / (8 * 1e15 * 0.5))
    assert s["fsdp"] == pytest.approx(8.0 * cfg.param_count() * 7 / 8 / 1e11)
    assert s["tensor"] == 0 and s["data"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--size=tiny", "--target=tpu:v5p-7"], r"^error: unknown TPU slice 'v5p-7'; known: v4-8, .*v6e-256\n$"),
    (["--size=huge", "--target=tpu:v5p-8"], r"^error: unknown model preset 'huge'; known: tiny, 7b, 13b, 34b, 70b\n$"),
    (["--size=7b", "--target=tpu:v5p-8", "--task=ppo"], r"^error: --task='ppo': expected one of pretrain, sft, "),
])
def test_bad_flags_are_one_line_errors_before_any_compile(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(argv)
    assert exit_info.value.code == 1
    assert pytest.importorskip("re").match(message, capsys.readouterr().err)


def _config_has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@needs_libtpu
@pytest.mark.slow  # one compile by the TPU compiler
def test_plan_tiny_on_a_small_slice_prints_overrides_that_fit(capsys):
    from configs import sft_tiny

    assert plan_cli.main(["--size=tiny", "--target=tpu:v5e-4", "--seq_len=256", "--global_batch=8",
                          "--max_compiles=1", "--task=lora"]) == 0
    out = capsys.readouterr().out
    compiled = [line for line in out.splitlines() if line.strip().startswith("compiled")]
    assert len(compiled) == 1 and compiled[0].endswith("-> FITS"), out
    chosen = [line for line in out.splitlines() if line.startswith("chosen")]
    assert len(chosen) == 1, out
    overrides = dict(flag.removeprefix("--config.").split("=") for flag in chosen[0].split(": ", 1)[1].split())
    config = sft_tiny.get_config()
    assert all(_config_has(config, key) for key in overrides), overrides
    assert int(overrides["mesh.data"]) * int(overrides["mesh.fsdp"]) * int(overrides["mesh.tensor"]) == 4
    assert overrides["lora.rank"] == "16" and overrides["batch_size"] == "8"
