"""`python -m llama2_jax.plan`: pick a mesh, per-shard batch, remat policy and gradient accumulation for a model,
task and TPU slice, checked by the TPU compiler on this machine (no TPU needed; the tpu-aot extra).

    python -m llama2_jax.plan --size=70b --target=tpu:v5p-64 --seq_len=4096 --task=pretrain
    python -m llama2_jax.plan --size=7b --target=tpu:v5e-8 --task=lora --global_batch=64

Prints the candidates compiled (cheapest first by the cost model of llama2_jax.accel.estimate.step_seconds, each
with the compiler's per-chip memory, fitting or not), those skipped by the closed-form memory estimate, and the
chosen `--config.*` overrides for the trainer. The search is llama2_jax.accel.planner.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from llama2_jax.accel import aot, planner
from llama2_jax.accel import tpu as accel_tpu
from llama2_jax.cli.common import fail
from llama2_jax.model.config import PRESETS, AttentionImpl, get_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama2_jax.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--size", required=True, help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--target", required=True, help="tpu:NAME, e.g. tpu:v5p-64")
    parser.add_argument("--task", default="pretrain", help=f"one of {', '.join(planner.PLAN_TASKS)}")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--global_batch", type=int, default=0,
                        help="sequences (pairs for rm/dpo) per optimizer step; 0 = the paper's for the task "
                             f"{planner.DEFAULT_GLOBAL_BATCH}")
    parser.add_argument("--attention", default=AttentionImpl.SPLASH.value,
                        help="attention kernel: splash (the TPU kernel), xla or chunked")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--max_compiles", type=int, default=16,
                        help="compile at most this many candidates (a refusal takes seconds, a fit minutes)")
    parser.add_argument("--keep", type=int, default=1, help="stop after this many candidates fit with 10 %% headroom")
    parser.add_argument("--verbose", action="store_true", help="print every candidate skipped by the estimate")
    return parser


def _check(args) -> tuple:
    """(TpuSlice, LlamaConfig) from the flags, or exit with one `error:` line (before anything is compiled)."""
    try:
        target = accel_tpu.parse_target(args.target)
        if args.task not in planner.PLAN_TASKS:
            raise ValueError(f"--task={args.task!r}: expected one of {', '.join(planner.PLAN_TASKS)}")
        allowed = (AttentionImpl.SPLASH.value, AttentionImpl.XLA.value, AttentionImpl.CHUNKED.value)
        if args.attention not in allowed:
            raise ValueError(f"--attention={args.attention!r}: expected one of {', '.join(allowed)}")
        for name in ("seq_len", "lora_rank", "max_compiles", "keep"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.global_batch < 0:
            raise ValueError(f"--global_batch must be >= 0, got {args.global_batch}")
        cfg = get_config(args.size, dtype="bfloat16", param_dtype="bfloat16" if args.task == "lora" else "float32",
                         scan_layers=True, max_seq_len=args.seq_len, attention_impl=args.attention)
    except ValueError as error:
        fail(str(error))
    problem = accel_tpu.libtpu_problem()
    if problem:
        fail(f"cannot compile for {target.name}: {problem}")
    return target, cfg


def _line(c: planner.Candidate, hbm: float) -> str:
    data, fsdp, tensor = c.mesh
    head = (f"mesh data={data} fsdp={fsdp} tensor={tensor} rows/shard={c.rows_per_shard} "
            f"accum={c.grad_accum_steps} remat={c.remat}: cost {c.seconds['total']:.3g} s/step (compute "
            f"{c.seconds['compute']:.3g}, fsdp {c.seconds['fsdp']:.3g}, tensor {c.seconds['tensor']:.3g}, data "
            f"{c.seconds['data']:.3g})")
    if c.skipped:
        return f"  skipped   {head}; {c.skipped}"
    if c.figure is None:
        return f"  ranked    {head}; not compiled, estimate {c.estimate_bytes / aot.GIB:.1f} GiB/chip"
    verdict = "FITS" if c.fits(hbm) else "does not fit with 10 % headroom"
    return f"  compiled  {head}; {c.figure.describe().replace('GiB/device', 'GiB/chip')} -> {verdict}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    target, cfg = _check(args)
    global_batch = args.global_batch or planner.DEFAULT_GLOBAL_BATCH[args.task]
    hbm = target.hbm_gib * aot.GIB
    print(f"{args.size} {args.task} on {target.name} ({target.chips} chips, {target.hbm_gib:.2f} GiB per chip), seq "
          f"{args.seq_len}, global batch {global_batch}, attention {cfg.attention_impl}", flush=True)
    devices = accel_tpu.compile_only_devices(target)
    candidates = planner.plan(cfg, args.task, target, devices, seq=args.seq_len, global_batch=global_batch,
                              max_compiles=args.max_compiles, keep=args.keep, lora_rank=args.lora_rank,
                              report=lambda c: print(_line(c, hbm), flush=True) if args.verbose or c.figure else None)
    if not candidates:
        fail(f"no mesh of {target.chips} chips divides --global_batch={global_batch} and the model's heads")
    skipped = [c for c in candidates if c.skipped]
    if skipped and not args.verbose:
        best = min(skipped, key=lambda c: c.estimate_bytes)
        print(f"  ({len(skipped)} candidates skipped without a compile: closed-form estimate > {planner.SKIP_FACTOR} x "
              f"HBM, the smallest {best.estimate_bytes / aot.GIB:.1f} GiB; --verbose lists them)")
    untouched = [c for c in candidates if c.figure is None and not c.skipped]
    if untouched:
        print(f"  ({len(untouched)} more candidates ranked lower, not compiled; the next: "
              f"{_line(untouched[0], hbm).strip()})")
    chosen = [c for c in candidates if c.fits(hbm)]
    if not chosen:
        print("no compiled candidate fits with 10 % headroom: raise --max_compiles, lower --global_batch or take a "
              "larger slice")
        return 1
    for c in chosen:
        print(f"chosen ({c.figure.total / aot.GIB:.2f} GiB/chip of {target.hbm_gib:.2f}): "
              f"{c.overrides(args.task, global_batch, args.seq_len, cfg, args.lora_rank)}")
    return 0
