"""Training throughput of the project's real train step, optionally next to HF transformers on the same config.

Ours is exactly what `train.pretrain` runs: `llama2_jax.training.state.create_train_state` (sharded float32 params and AdamW
state), `llama2_jax.training.state.jit_train_step` bound to `llama2_jax.training.losses.next_token_loss` with the paper's optimizer and
warmup-cosine schedule, state donated, batch split over the mesh's data axes. Only the data is synthetic: uniform
random tokens, one document per row, in the trainer's batch format (inputs, targets, positions, segment_ids,
loss_mask). The step is AOT-compiled once (compile time is reported separately), run --warmup times, then --steps
timed steps; tokens/s comes from the median step time. One line per side:

  python benchmarks/train_step.py                                   # CPU: the issue's dim-512 config, ours only
  python benchmarks/train_step.py --compare=hf                      # + HF LlamaForCausalLM, same config and batch
  python benchmarks/train_step.py --dim=2048 --n_layers=22 --n_heads=32 --n_kv_heads=4 --ffn=5632 \\
      --seq=2048 --batch=8 --dtype=bfloat16 --attention=cudnn --compare=hf   # one GPU (see benchmarks/gpu.sh)

Fields: tok/s (global tokens per second), TFLOP/s (tok/s x `LlamaConfig.flops_per_token(seq)`, i.e. 6·N_matmul +
12·L·d·T: the same model FLOPs for every side), MFU (`llama2_jax.training.perf.mfu`; n/a on CPUs, which have no entry in the
peak table), peak memory (GPU: the allocator's peak_bytes_in_use; CPU: XLA's compiled estimate of argument + output
+ temp - alias for ours, the process's peak RSS for torch).

HF side (`--compare=hf`): `transformers.LlamaForCausalLM` with the same dims and float32 master weights, the same
token batch, next-token cross-entropy in float32 over all T positions (as ours), `clip_grad_norm_(1.0)` and
`torch.optim.AdamW` (0.9/0.95, eps 1e-5, decay 0.1 on matrices; fused on CUDA). Variants (`--hf_variants`):
eager_fp32, eager_bf16 (torch.autocast bfloat16), compile_fp32, compile_bf16 (`torch.compile(model)`; a variant that
fails prints its error on its line and the others still run). HF attention is its default, SDPA (`--hf_attention`).

Attention masks (`--segments`): "packed" (default) feeds segment_ids as the trainer always does, so attention takes
the segment-mask path (xla: a [B,1,T,T] mask; cudnn: a masked kernel); "none" leaves them out, so attention is plain
causal (cudnn's fused causal kernel), as HF without an attention mask.

This file imports only jax/flax/optax/numpy (and torch/transformers for --compare=hf): no grain, ml_collections or
tensorflow_datasets (tests/system/test_benchmarks.py checks it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import resource
import statistics
import sys
import time
from typing import Optional

if __name__ == "__main__":  # `python benchmarks/train_step.py` from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import AttentionImpl, LlamaConfig, RematPolicy
from llama2_jax.model.llama import Llama
from llama2_jax.training import losses, perf
from llama2_jax.training import state as train_state

HF_VARIANTS = ("eager_fp32", "eager_bf16", "compile_fp32", "compile_bf16")
GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------------------------------
# Set-up shared by both sides


def model_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_kv_heads, hidden_dim=args.ffn, max_seq_len=args.seq, dtype=args.dtype,
                       param_dtype="float32", scan_layers=args.scan, remat_policy=args.remat,
                       attention_impl=args.attention)


def synthetic_batch(batch: int, seq: int, vocab: int, segments: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The trainer's batch format (llama2_jax/data/packing.py) for one random document per row: targets are the
    inputs shifted by one, every target supervised. segments="none" sets segment_ids to None (plain causal
    attention)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq + 1), dtype=np.int32)
    out = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    if segments == "none":
        out["segment_ids"] = None  # next_token_loss passes it on; the model then takes the plain causal path
    return out


def device_name() -> str:
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.device_kind} x{jax.device_count()}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {os.cpu_count()} cores)"


def throughput_fields(tokens_per_sec: float, cfg: LlamaConfig, seq: int) -> str:
    """tok/s, TFLOP/s and MFU with the same FLOP count for every side."""
    flops = cfg.flops_per_token(seq)
    mfu = perf.mfu(tokens_per_sec, flops, jax.device_count())
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    return f"tok/s={tokens_per_sec:,.0f} TFLOP/s={tokens_per_sec * flops / 1e12:.3g} MFU={mfu_text}"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def xla_flags_text() -> str:
    """XLA_FLAGS in effect (they change CPU throughput a lot), as a trailing field; empty when unset."""
    flags = os.environ.get("XLA_FLAGS", "").strip()
    return f" xla_flags='{flags}'" if flags else ""


def config_text(cfg: LlamaConfig) -> str:
    return (f"dim{cfg.dim}/L{cfg.n_layers}/H{cfg.n_heads}/KV{cfg.n_kv_heads}/F{cfg.hidden_dim}/V{cfg.vocab_size}")


# --------------------------------------------------------------------------------------------------------------------
# Ours: the trainer's state, loss and jitted step


def build_ours(cfg: LlamaConfig, mesh, *, peak_lr: float = 3e-4, total_steps: int = 1000, seed: int = 0):
    """(state, jitted step) exactly as `train.pretrain.train_and_evaluate` builds them (via
    llama2_jax/training/initial_state.py's init_state and make_tx): boxed init -> sharded TrainState; next_token_loss
    -> jit_train_step."""
    model = Llama(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    init_fn = functools.partial(lambda rng: model.init(rng, tokens)["params"], jax.random.PRNGKey(seed))
    schedule = train_state.warmup_cosine_schedule(peak_lr, warmup_steps=10, total_steps=total_steps)
    tx = train_state.make_optimizer(schedule)  # AdamW 0.9/0.95, eps 1e-5, decay 0.1, clip 1.0 (the defaults)
    state, shardings = train_state.create_train_state(init_fn, tx, mesh)
    loss_fn = functools.partial(losses.next_token_loss, model=model)
    step = train_state.jit_train_step(loss_fn, shardings, mesh, learning_rate_fn=schedule)
    return state, step


def compiled_bytes(compiled) -> Optional[int]:
    """XLA's per-device estimate: arguments + outputs + temporaries - aliased (donated) buffers."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend/version reports it
        return None


class OursSide:
    """Our step, built and AOT-compiled as the trainer's; `step()` runs one and returns its seconds."""
    name = "ours"

    def __init__(self, args, cfg: LlamaConfig, batch_np: dict):
        self.args, self.cfg = args, cfg
        mesh = sh.make_mesh(*args.mesh, devices=jax.devices()[:args.devices] if args.devices else None)
        self.state, step = build_ours(cfg, mesh)
        self.batch = {k: None if v is None else jax.device_put(v, sh.batch_sharding(mesh, v.ndim))
                      for k, v in batch_np.items()}
        start = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.loss = float("nan")

    def warmup(self) -> None:
        for _ in range(self.args.warmup):
            self.step()

    def step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        self.loss = float(metrics["loss"])  # waits for the whole step (metrics come out of the same executable)
        return time.perf_counter() - start

    def line(self, step_s: float, ours_tps: Optional[float] = None) -> str:
        args, cfg = self.args, self.cfg
        device = jax.devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            memory = f"peak_mem={stats['peak_bytes_in_use'] / GIB:.2f}GiB(allocator)"
        else:
            estimate = compiled_bytes(self.compiled)
            memory = f"peak_mem={estimate / GIB:.2f}GiB(xla-estimate)" if estimate is not None else "peak_mem=n/a"
            memory += f" rss={peak_rss_gib():.2f}GiB"
        return (f"device={device_name()} side=ours {config_text(cfg)} dtype={cfg.dtype} remat={cfg.remat_policy} "
                f"scan={int(cfg.scan_layers)} attention={cfg.attention_impl} segments={args.segments} "
                f"batch={args.batch} seq={args.seq} step_ms={1e3 * step_s:.1f} "
                f"{throughput_fields(args.batch * args.seq / step_s, cfg, args.seq)} {memory} "
                f"compile_s={self.compile_s:.1f} loss={self.loss:.3f}{xla_flags_text()}")

    def close(self) -> None:
        self.state = self.compiled = None


# --------------------------------------------------------------------------------------------------------------------
# HF transformers (PyTorch) on the same config and batch


def hf_model(cfg: LlamaConfig, attention: str, device: str, seed: int = 0):
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False)
    hf_config._attn_implementation = attention  # noqa: SLF001 - the documented way to pick it without from_pretrained
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=torch.float32).train()


class HFSide:
    """One HF variant: float32 master weights, AdamW (+ clipping) step on the same batch; `step()` -> seconds."""
    def __init__(self, args, cfg: LlamaConfig, batch_np: dict, variant: str):
        import torch

        self.args, self.cfg, self.variant, self.name = args, cfg, variant, f"hf-{variant}"
        self.device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
        self.model = hf_model(cfg, args.hf_attention, self.device)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-5, fused=self.device == "cuda")
        self.forward = torch.compile(self.model) if variant.startswith("compile") else self.model
        self.autocast = variant.endswith("bf16")
        self.inputs = torch.as_tensor(batch_np["inputs"], dtype=torch.long, device=self.device)
        self.targets = torch.as_tensor(batch_np["targets"], dtype=torch.long, device=self.device)
        self.first_s = float("nan")
        self.loss = float("nan")

    def warmup(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.first_s = self.step()  # includes torch.compile's compilation for the compile variants
        for _ in range(max(self.args.warmup - 1, 0)):
            self.step()

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward(input_ids=self.inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, self.cfg.vocab_size),
                                                 self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())  # synchronises with the device
        return time.perf_counter() - start

    def head(self) -> str:
        return (f"device={device_name()} side={self.name} {config_text(self.cfg)} attention={self.args.hf_attention} "
                f"batch={self.args.batch} seq={self.args.seq}")

    def line(self, step_s: float, ours_tps: Optional[float] = None) -> str:
        import torch

        tokens_per_sec = self.args.batch * self.args.seq / step_s
        if self.device == "cuda":
            memory = f"peak_mem={torch.cuda.max_memory_allocated() / GIB:.2f}GiB(torch)"
        else:
            memory = f"rss={peak_rss_gib():.2f}GiB"
        ratio = f" ours/hf={ours_tps / tokens_per_sec:.2f}x" if ours_tps else ""
        return (f"{self.head()} step_ms={1e3 * step_s:.1f} "
                f"{throughput_fields(tokens_per_sec, self.cfg, self.args.seq)} {memory} "
                f"first_step_s={self.first_s:.1f} loss={self.loss:.3f}{ratio}")

    def close(self) -> None:
        """Free the model, optimizer state and compiled graphs before the next variant."""
        import torch

        self.model = self.optimizer = self.forward = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # noqa: SLF001 - drops compiled graphs (and the model they hold)


def failed_line(args, cfg: LlamaConfig, name: str, error: Exception) -> str:
    message = " ".join(str(error).split())[:300]
    return (f"device={device_name()} side={name} {config_text(cfg)} batch={args.batch} seq={args.seq} "
            f"FAILED {type(error).__name__}: {message}")


# --------------------------------------------------------------------------------------------------------------------
# Scheduling: one side after the other (GPU: one model in memory at a time), or interleaved step by step (shared
# CPUs: every side sees the same background load, so the ratios hold even when the absolute figures drift)


def run_sides(args, cfg: LlamaConfig, batch_np: dict) -> None:
    makers = [] if args.no_ours else [("ours", lambda: OursSide(args, cfg, batch_np))]
    if args.compare == "hf":
        makers += [(f"hf-{v}", functools.partial(HFSide, args, cfg, batch_np, v)) for v in args.hf_variants.split(",")]
    ours_tps = None

    def report(side, times):
        nonlocal ours_tps
        step_s = statistics.median(times)
        if side.name == "ours":
            ours_tps = args.batch * args.seq / step_s
        print(side.line(step_s, None if side.name == "ours" else ours_tps), flush=True)

    def start(name, make):
        try:
            side = make()
            side.warmup()
            return side
        except Exception as error:  # noqa: BLE001 - a failing HF variant (torch.compile, OOM) must not stop the rest
            if name == "ours":
                raise
            print(failed_line(args, cfg, name, error), flush=True)
            return None

    if args.schedule == "sequential":
        for name, make in makers:
            side = start(name, make)
            if side is None:
                continue
            try:
                report(side, [side.step() for _ in range(args.steps)])
            except Exception as error:  # noqa: BLE001
                if name == "ours":
                    raise
                print(failed_line(args, cfg, name, error), flush=True)
            side.close()
        return
    sides = [side for side in (start(name, make) for name, make in makers) if side is not None]
    times = {side.name: [] for side in sides}
    for _ in range(args.steps):
        for side in list(sides):
            try:
                times[side.name].append(side.step())
            except Exception as error:  # noqa: BLE001
                if side.name == "ours":
                    raise
                print(failed_line(args, cfg, side.name, error), flush=True)
                sides.remove(side)
    for side in sides:
        report(side, times[side.name])
        side.close()


# --------------------------------------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser, *, dim: int, n_layers: int, ffn: int, seq: int) -> None:
    """The model-shape and batch flags every step benchmark takes (8 query / 4 KV heads, Llama 2's vocabulary)."""
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--n_layers", type=int, default=n_layers)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=ffn, help="FFN hidden width (hidden_dim)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--batch", type=int, default=8, help="global sequences per step")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model: the issue's CPU config by default (a 40M-parameter Llama with GQA and Llama 2's vocabulary).
    add_model_flags(parser, dim=512, n_layers=8, ffn=1376, seq=256)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (params and Adam stay float32); auto = float32 on CPU, bfloat16 else")
    parser.add_argument("--remat", choices=[p.value for p in RematPolicy], default="none")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False, help="nn.scan over layers")
    parser.add_argument("--attention", choices=[a.value for a in AttentionImpl], default="xla")
    parser.add_argument("--segments", choices=("packed", "none"), default="packed",
                        help="packed: segment_ids in the batch, as the trainer (masked attention); none: plain causal")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one may be -1), as config.mesh")
    parser.add_argument("--devices", type=int, default=0, help="use the first N devices (0 = all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--compare", choices=("none", "hf"), default="none")
    parser.add_argument("--no_ours", action="store_true", help="skip our step (e.g. HF in its own process on GPU)")
    parser.add_argument("--hf_variants", default="auto",
                        help=f"comma-separated subset of {','.join(HF_VARIANTS)}; auto = eager_fp32,compile_fp32 on "
                             "CPU (bfloat16 matmuls are emulated on CPUs without bf16 units: ~20x slower), "
                             "eager_bf16,compile_bf16 on GPU")
    parser.add_argument("--schedule", choices=("auto", "sequential", "interleaved"), default="auto",
                        help="interleaved: alternate timed steps between the sides (robust to a shared machine's "
                             "changing load; all models in memory at once); auto = interleaved on CPU, sequential "
                             "on GPU")
    parser.add_argument("--hf_attention", choices=("sdpa", "eager"), default="sdpa",
                        help="HF attention implementation (sdpa is HF's default)")
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    if args.schedule == "auto":
        args.schedule = "interleaved" if jax.devices()[0].platform == "cpu" else "sequential"
    args.mesh = tuple(int(x) for x in args.mesh.split(","))
    if len(args.mesh) != 3:
        parser.error("--mesh takes three sizes: data,fsdp,tensor")
    if args.hf_variants == "auto":
        on_cpu = jax.devices()[0].platform == "cpu"
        args.hf_variants = "eager_fp32,compile_fp32" if on_cpu else "eager_bf16,compile_bf16"
    unknown = set(args.hf_variants.split(",")) - set(HF_VARIANTS)
    if unknown:
        parser.error(f"unknown --hf_variants {sorted(unknown)}; known: {', '.join(HF_VARIANTS)}")
    if args.attention == AttentionImpl.CUDNN.value and jax.devices()[0].platform != "gpu":
        parser.error("--attention=cudnn needs an NVIDIA GPU")
    if args.attention == AttentionImpl.SPLASH.value and jax.devices()[0].platform != "tpu":
        parser.error("--attention=splash needs a TPU")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = model_config(args)
    batch_np = synthetic_batch(args.batch, args.seq, args.vocab, args.segments)
    run_sides(args, cfg, batch_np)


if __name__ == "__main__":
    main()
