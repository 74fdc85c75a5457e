"""Per-device memory of the real train step for 7B, 13B and 70B, without a single accelerator: AOT compilation on
simulated CPU devices, next to a closed-form estimate.

  python benchmarks/memory.py                       # 7b, 13b on fsdp=8; 70b on fsdp=64; seq 4096, 1 row per device
  python benchmarks/memory.py --sizes=7b --remat=minimal
  python benchmarks/memory.py --sizes=70b --layers=4,8   # compile with 4 and 8 layers, extrapolate linearly to 80

What is compiled is exactly the trainer's step (`llama2_jax.training.state.jit_train_step` + `next_token_loss`, AdamW state, FSDP
shardings from `LOGICAL_RULES`, donation), lowered on `jax.ShapeDtypeStruct`s that carry their shardings, so nothing
is allocated: `jit(...).lower(abstract_state, abstract_batch).compile().memory_analysis()`. Mixed precision as the
size configs: float32 params and Adam moments, bfloat16 compute, `scan_layers=True`; the remat policy is a flag
(default "auto": the policy that recomputes least among those whose formula estimate fits --budget_gib).

XLA's figure printed is argument + output + temp - alias bytes per device. Caveats: the compiler is XLA:CPU, whose
fusion and scheduling differ from XLA:GPU's (it may keep extra float32 copies where the GPU would not, and it has no
latency-hiding scheduler for the FSDP all-gathers); attention is the reference "xla" einsum unless --attention says
otherwise, which materialises [B, N, T, T] scores ("chunked" and cuDNN flash attention on a GPU do not; the formula's
"attention" term shows that part).

With --lora_rank=R the step is LoRA SFT instead (llama2_jax/model/lora.py): the base frozen in bfloat16, float32 adapters
of rank R on all seven kernels, AdamW state and gradients over the adapters only; default sizes 7b and 13b on one
device, 70b on fsdp=8, remat "minimal" unless --remat says otherwise (see the XLA:CPU flag below), and attention
"chunked" unless --attention says otherwise (query blocks recomputed in the backward pass: no [N, T, T] float32
scores, probabilities or gradients; the same numbers as "xla", see llama2_jax/model/attention.py).

With --target=tpu:NAME (e.g. tpu:v5p-8; needs `pip install -e .[tpu-aot]`) the compiler is the TPU's own (libtpu),
for the compile-only devices of that slice (llama2_jax.accel.tpu), and every trainer kind of --tasks is compiled
(llama2_jax.accel.aot: pretrain, sft, lora, rm, dpo, ppo_policy, ppo_value), attention "splash" unless --attention
says otherwise, remat "auto" = the closed form's pick against 90 % of the chip's HBM (LoRA: minimal), compiled, and
if the compiler refuses it or leaves < 10 % of the chip, the next policy that recomputes more (each attempt printed):

  python benchmarks/memory.py --target=tpu:v5p-8 --sizes=7b
  python benchmarks/memory.py --target=tpu:v5p-64 --sizes=70b --tasks=pretrain,lora --layers=2,4

With --target=gpu:NAME (h100-8, a100-64, ...; `pip install -e .[gpu-aot]`, the CUDA PJRT plugin without CUDA
libraries) it is XLA's GPU compiler, deviceless (llama2_jax.accel.gpu; attention "xla", "chunked" for LoRA).

It prints per chip argument/output/temp/alias bytes against the chip's HBM and the compile seconds (no time
estimate: `cost_analysis()` counts a scanned layer stack once and Pallas kernels not at all). A program that does not
fit is refused by the TPU compiler; its message (the bytes it needed) is printed instead.

The XLA flag below must be set before JAX is imported, so run this file as a script (tests import only the
formula and set their own device count).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # 64 simulated CPU devices: enough for the 70B mesh; 7B/13B use the first 8
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if (any(arg.startswith("--lora_rank") and not arg.endswith("=0") for arg in sys.argv)
            and not any(arg.startswith("--target") for arg in sys.argv)):
        # XLA:CPU has no bfloat16 matmul: it converts the operands to float32, and its while-loop invariant code
        # motion then hoists that conversion of the WHOLE stacked bfloat16 base out of the layer scan, a float32
        # copy of the base that XLA:GPU/TPU (native bfloat16 dots) never make (measured on 7B: temp +0.75 GiB per
        # layer with the passes, constant without). LoRA mode is the only one with a bfloat16 base: disable them.
        os.environ["XLA_FLAGS"] += (" --xla_disable_hlo_passes=while-loop-invariant-code-motion,"
                                    "while-loop-expensive-invariant-code-motion")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402

from llama2_jax.accel import aot, planner, targets  # noqa: E402
from llama2_jax.accel.estimate import PAIR_TASKS, POLICY_ORDER, memory_formula, pick_policy, task_memory  # noqa: E402
from llama2_jax.model import lora  # noqa: E402
from llama2_jax.model import sharding as sh  # noqa: E402
from llama2_jax.model.config import AttentionImpl, LlamaConfig, RematPolicy, get_config  # noqa: E402
from llama2_jax.model.llama import abstract_params  # noqa: E402

GIB = 1024 ** 3
SIZES = {"7b": 8, "13b": 8, "70b": 64}  # preset -> fsdp devices
LORA_SIZES = {"7b": (1, 24.0), "13b": (1, 40.0), "70b": (8, 40.0)}  # preset -> (fsdp devices, GiB budget), LoRA SFT
# --------------------------------------------------------------------------------------------------------------------
# XLA's figure


def cpu_mesh(n_devices: int):
    """An fsdp mesh over the first n_devices simulated CPU devices."""
    return sh.make_mesh(1, n_devices, 1, devices=jax.devices()[:n_devices])


def compile_step(cfg: LlamaConfig, n_devices: int, seq: int, batch_per_device: int) -> aot.MemoryFigure:
    """AOT-compile the pretraining step (llama2_jax.accel.aot) on an fsdp mesh of n_devices CPU devices."""
    return aot.compile_train_step("pretrain", cfg, cpu_mesh(n_devices), seq_len=seq, batch_per_device=batch_per_device)


def compile_lora_step(cfg: LlamaConfig, n_devices: int, seq: int, batch_per_device: int, rank: int
                      ) -> aot.MemoryFigure:
    """AOT-compile one LoRA SFT step: the trainer's step over {"lora": adapters} with the frozen base
    (cfg.param_dtype) as a separate, non-donated argument (llama2_jax.accel.aot)."""
    base = abstract_params(cfg)
    adapters = lora.abstract(base, cfg, lora.LoraConfig(rank=rank, alpha=2.0 * rank))
    print(f"  {cfg.n_layers} layers: " + lora.describe(adapters, base), flush=True)
    return aot.compile_train_step("lora", cfg, cpu_mesh(n_devices), seq_len=seq, batch_per_device=batch_per_device,
                                  lora_rank=rank)


def lora_main(args) -> None:
    """--lora_rank: XLA's per-device figure of LoRA SFT for each size against its budget."""
    for name in args.sizes.split(","):
        n, budget = LORA_SIZES[name]
        remat = RematPolicy.MINIMAL.value if args.remat == "auto" else args.remat
        attention = AttentionImpl.CHUNKED.value if args.attention == "auto" else args.attention
        cfg = get_config(name, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, max_seq_len=args.seq,
                         remat_policy=remat, attention_impl=attention, attention_block_size=args.attention_block_size)
        counts = [int(x) for x in args.layers.split(",")] if args.layers else [cfg.n_layers]
        results = [compile_lora_step(cfg.replace(n_layers=c), n, args.seq, args.batch_per_device, args.lora_rank)
                   for c in counts]
        if len(counts) > 1:
            (l0, r0), (l1, r1) = (counts[0], results[0]), (counts[-1], results[-1])
            per_layer = (r1.total - r0.total) / (l1 - l0)
            total = r0.total + per_layer * (cfg.n_layers - l0)
            how = f"extrapolated from {l0} and {l1} layers: {per_layer / GIB:.3f} GiB/layer"
        else:
            r = results[0]
            total = r.total
            how = f"arg {fmt(r.argument)} + out {fmt(r.output)} + temp {fmt(r.temp)} - alias {fmt(r.alias)}"
        fits = "fits" if total <= budget * GIB else "DOES NOT FIT"
        print(f"lora rank={args.lora_rank} {name} fsdp={n} seq={args.seq} batch/device={args.batch_per_device} "
              f"remat={remat} attention={attention_label(cfg)} base=bfloat16: xla={fmt(total)} GiB/device ({how}; compile "
              f"{sum(r.compile_s for r in results):.0f}s) -> {fits} in {budget:.0f} GiB", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# The TPU compiler (--target=tpu:NAME)


def extrapolate(small: aot.MemoryFigure, large: aot.MemoryFigure, l0: int, l1: int, n_layers: int) -> aot.MemoryFigure:
    """Each memory term linear in the layer count through the figures compiled with l0 and l1 layers."""
    at = lambda a, b: int(round(a + (b - a) * (n_layers - l0) / (l1 - l0)))  # noqa: E731
    return aot.MemoryFigure(at(small.argument, large.argument), at(small.output, large.output),
                            at(small.temp, large.temp), at(small.alias, large.alias), small.compile_s + large.compile_s)


def verdict(figure: aot.MemoryFigure, hbm: float, on_tpu: bool) -> str:
    """Whether the step fits the chip. The TPU compiler refuses what does not (its own peak against its available
    HBM); the headroom is against XLA's argument + output + temp - alias sum, an upper bound of that peak. The GPU
    compiler checks nothing: the sum is compared with the GPU's memory."""
    if figure.error:
        return "DOES NOT FIT (the compiler refused it)"
    headroom = 100.0 * (1.0 - figure.total / hbm)
    if headroom < 0:
        return "fits by the compiler's peak, but no headroom (the sum exceeds the chip)" if on_tpu else "DOES NOT FIT"
    return f"fits, {headroom:.0f} % headroom" + ("" if headroom >= 10 else " (< 10 %)")


def target_config(name: str, task: str, args, hbm_bytes: float, mesh_shape: tuple[int, int, int],
                  on_tpu: bool) -> LlamaConfig:
    """The size's config as the trainers run it on the target: bfloat16 compute, scanned layers, float32 master
    weights (a bfloat16 frozen base for LoRA), the kernel and remat policy of the flags (auto: splash on a TPU, else
    chunked for LoRA and xla otherwise, cuDNN's kernel needing a GPU to compile; the least-recomputing policy whose
    closed form with the task's state (`estimate.task_memory`: DPO's reference included) fits 90 % of the chip for
    full training, "minimal" for LoRA; `compile_fitting` then lets the compiler overrule the closed form)."""
    if args.attention != "auto":
        attention = args.attention
    elif on_tpu:
        attention = AttentionImpl.SPLASH.value
    else:
        attention = AttentionImpl.CHUNKED.value if task == "lora" else AttentionImpl.XLA.value
    cfg = get_config(name, dtype="bfloat16", param_dtype="bfloat16" if task == "lora" else "float32",
                     scan_layers=True, max_seq_len=args.seq, attention_impl=attention,
                     attention_block_size=args.attention_block_size, attention_kv_block_size=args.attention_block_size)
    if args.remat != "auto":
        return cfg.replace(remat_policy=args.remat)
    if task == "lora":
        return cfg.replace(remat_policy=RematPolicy.MINIMAL.value)
    program = "pretrain" if task in ("sft", "ppo_policy", "ppo_value") else task  # the same state as pretraining
    for policy in planner.policies(cfg):
        estimate = task_memory(cfg, program, args.seq, args.batch_per_device, mesh_shape, policy,
                               args.grad_accum_steps)
        if estimate <= 0.9 * hbm_bytes:
            return cfg.replace(remat_policy=policy)
    return cfg.replace(remat_policy=POLICY_ORDER[-1])


def compile_fitting(cfg: LlamaConfig, measure, hbm: float, report) -> tuple[LlamaConfig, aot.MemoryFigure, str]:
    """remat "auto" checked by the compiler: compile `cfg` (`measure(cfg) -> (figure, how)`); while the compiler
    refuses it or its figure leaves < 10 % of the chip, `report` that attempt and take the next policy that
    recomputes more (`planner.policies`). The closed form underestimates remat "none" on the TPU (7B, one row per
    chip: 50.6 GiB estimated, 62.7 compiled), so its pick alone is not enough. Returns the last attempt."""
    order = planner.policies(cfg)
    while True:
        figure, how = measure(cfg)
        fits = not figure.error and figure.total <= (1 - planner.HEADROOM) * hbm
        later = order[order.index(cfg.remat_policy) + 1:] if cfg.remat_policy in order else ()
        if fits or not later:
            return cfg, figure, how
        report(cfg, figure, how)
        cfg = cfg.replace(remat_policy=later[0])


def measure_step(task: str, cfg: LlamaConfig, *, mesh, args) -> tuple[aot.MemoryFigure, str]:
    """(the compiler's figure of `task`'s step, how it was obtained): the whole depth, or with --layers=L0,L1 two
    compiles extrapolated linearly."""
    def compile_one(c: LlamaConfig) -> aot.MemoryFigure:
        return aot.compile_train_step(task, c, mesh, seq_len=args.seq, batch_per_device=args.batch_per_device,
                                      grad_accum_steps=args.grad_accum_steps, lora_rank=args.lora_rank)

    if not args.layers:
        return compile_one(cfg), f"all {cfg.n_layers} layers"
    l0, l1 = (int(x) for x in args.layers.split(","))
    small, large = compile_one(cfg.replace(n_layers=l0)), compile_one(cfg.replace(n_layers=l1))
    failed = small if small.error else large if large.error else None
    return (failed or extrapolate(small, large, l0, l1, cfg.n_layers),
            f"extrapolated from {l0} layers ({small.total / GIB:.2f} GiB) and {l1} layers "
            f"({large.total / GIB:.2f} GiB)")


def target_main(args) -> None:
    """--target=tpu:NAME or gpu:NAME: the target compiler's per-chip figure of every requested trainer kind for each
    size."""
    try:
        target = targets.parse_target(args.target)
        mesh_shape = [int(x) for x in args.mesh.split(",")]
        unknown = sorted(set(args.tasks.split(",")) - set(aot.TASKS))
        if unknown or len(mesh_shape) != 3:
            raise ValueError(f"unknown --tasks {unknown}; known: {', '.join(aot.TASKS)}" if unknown else
                             f"--mesh={args.mesh}: expected DATA,FSDP,TENSOR (one may be -1)")
        mesh = sh.make_mesh(*mesh_shape, devices=targets.compile_only_devices(target))
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None
    hbm = target.hbm_gib * GIB
    on_tpu = targets.is_tpu(target)
    print(f"target {target.name}: {target.chips} chips, {target.hbm_gib:.2f} GiB per chip for programs; mesh "
          f"{dict(mesh.shape)}", flush=True)
    mesh_tuple = tuple(mesh.shape[axis] for axis in sh.MESH_AXES)

    def print_line(name: str, task: str, cfg: LlamaConfig, figure: aot.MemoryFigure, how: str) -> None:
        unit = "pair" if task in PAIR_TASKS else "row"
        print(f"{name} {task} {target.name} mesh={','.join(map(str, mesh_tuple))} seq={args.seq} "
              f"{unit}s/shard={args.batch_per_device} accum={args.grad_accum_steps} remat={cfg.remat_policy} "
              f"attention={attention_label(cfg)}: "
              f"{figure.describe().replace('GiB/device', 'GiB/chip')} of {target.hbm_gib:.2f} GiB -> "
              f"{verdict(figure, hbm, on_tpu)} [{how}]", flush=True)

    for name in args.sizes.split(","):
        done: dict[str, tuple] = {}
        for task in args.tasks.split(","):
            program = "pretrain" if task == "sft" else task  # SFT's step is pretraining's; the loss mask is data
            if program in done:
                figure, cfg, how = done[program]
                how = f"the {program} program: {how}"
            else:
                cfg = target_config(name, task, args, hbm, mesh_tuple, on_tpu)
                measure = functools.partial(measure_step, task, mesh=mesh, args=args)
                if args.remat == "auto" and task != "lora":
                    cfg, figure, how = compile_fitting(cfg, measure, hbm, functools.partial(print_line, name, task))
                    how += "; remat auto, checked by the compiler"
                else:
                    figure, how = measure(cfg)
                done[program] = (figure, cfg, how)
            print_line(name, task, cfg, figure, how)


def attention_label(cfg: LlamaConfig) -> str:
    if cfg.attention_impl == AttentionImpl.CHUNKED.value:
        return f"chunked/{cfg.attention_block_size}"
    return cfg.attention_impl


def fmt(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="7b,13b,70b", help=f"comma-separated subset of {','.join(SIZES)}")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch_per_device", type=int, default=1)
    parser.add_argument("--remat", choices=("auto",) + POLICY_ORDER, default="auto")
    parser.add_argument("--budget_gib", type=float, default=80.0, help="per-device memory the step must fit")
    parser.add_argument("--layers", default="",
                        help="compile with these layer counts (e.g. 2,4) and extrapolate linearly to the full depth "
                             "instead of compiling the full model")
    parser.add_argument("--lora_rank", type=int, default=0,
                        help="> 0: LoRA SFT of this rank (frozen bfloat16 base) on 7b/13b x1 device, 70b on fsdp=8; "
                             "with --target the rank of the lora task (default 16)")
    parser.add_argument("--attention", choices=["auto", AttentionImpl.XLA.value, AttentionImpl.CHUNKED.value,
                                                AttentionImpl.SPLASH.value],
                        default="auto", help="attention kernel compiled (cudnn needs a GPU to compile, splash a TPU "
                                             "target); auto: splash for a TPU target, else chunked for LoRA, xla "
                                             "otherwise")
    parser.add_argument("--attention_block_size", type=int, default=512,
                        help="queries per block of chunked attention; splash's query and key blocks")
    parser.add_argument("--target", default="", help="tpu:NAME (e.g. tpu:v5p-8) or gpu:NAME (e.g. gpu:h100-8): compile "
                                                      "with that platform's compiler for its compile-only devices "
                                                      "(the tpu-aot / gpu-aot extra) instead of on CPU devices")
    parser.add_argument("--tasks", default=",".join(aot.TASKS), help="with --target: trainer kinds to compile")
    parser.add_argument("--grad_accum_steps", type=int, default=1,
                        help="with --target: micro-batches per step (the trainers' config.grad_accum_steps; adds a "
                             "float32 gradient sum)")
    parser.add_argument("--mesh", default="1,-1,1", help="with --target: DATA,FSDP,TENSOR mesh axes over the chips")
    args = parser.parse_args(argv)
    if args.attention_block_size <= 0:
        parser.error(f"--attention_block_size must be positive, got {args.attention_block_size}")
    if args.grad_accum_steps < 1 or (args.grad_accum_steps > 1 and not args.target):
        parser.error(f"--grad_accum_steps={args.grad_accum_steps}: must be >= 1, and > 1 only with --target")
    if args.target:
        args.lora_rank = args.lora_rank or 16
        return target_main(args)
    if args.attention == AttentionImpl.SPLASH.value:
        parser.error("--attention=splash compiles only for a TPU: pass --target=tpu:NAME")
    if args.lora_rank > 0:
        return lora_main(args)

    for name in args.sizes.split(","):
        n = SIZES[name]
        attention = AttentionImpl.XLA.value if args.attention == "auto" else args.attention
        cfg = get_config(name, dtype="bfloat16", param_dtype="float32", scan_layers=True, max_seq_len=args.seq,
                         attention_impl=attention, attention_block_size=args.attention_block_size)
        remat = args.remat if args.remat != "auto" else pick_policy(cfg, args.seq, args.batch_per_device, n,
                                                                     args.budget_gib * GIB, attention)
        cfg = cfg.replace(remat_policy=remat)
        formula = memory_formula(cfg, args.seq, args.batch_per_device, n, remat, attention)
        if args.layers:
            counts = [int(x) for x in args.layers.split(",")]
            results = [compile_step(cfg.replace(n_layers=c), n, args.seq, args.batch_per_device) for c in counts]
            (l0, r0), (l1, r1) = (counts[0], results[0]), (counts[-1], results[-1])
            per_layer = (r1.total - r0.total) / (l1 - l0)
            xla_total = r0.total + per_layer * (cfg.n_layers - l0)
            how = (f"extrapolated from {l0} layers ({fmt(r0.total)} GiB) and {l1} layers ({fmt(r1.total)} GiB): "
                   f"{per_layer / GIB:.3f} GiB/layer; compile {sum(r.compile_s for r in results):.0f}s")
        else:
            r = compile_step(cfg, n, args.seq, args.batch_per_device)
            xla_total = r.total
            how = (f"arg {fmt(r.argument)} + out {fmt(r.output)} + temp {fmt(r.temp)} - alias {fmt(r.alias)}; "
                   f"compile {r.compile_s:.0f}s")
        terms = " ".join(f"{k}={fmt(v)}" for k, v in formula.items() if k != "total")
        flash = memory_formula(cfg, args.seq, args.batch_per_device, n, remat, attention="cudnn")["total"]
        fits = "fits" if xla_total <= args.budget_gib * GIB else "DOES NOT FIT"
        print(f"{name} fsdp={n} seq={args.seq} batch/device={args.batch_per_device} remat={remat} "
              f"attention={attention_label(cfg)}: "
              f"xla={fmt(xla_total)} GiB/device ({how}) formula={fmt(formula['total'])} GiB ({terms}) "
              f"formula_with_flash_attention={fmt(flash)} GiB -> {fits} in {args.budget_gib:.0f} GiB",
              flush=True)


if __name__ == "__main__":
    main()
