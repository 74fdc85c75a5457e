"""LoRA train step next to the full fine-tuning step on the same config and batch, both timed in the same run.

Full: `train_step.build_ours` (the trainers' sharded float32 TrainState, next_token_loss, jit_train_step). LoRA: the
trainers' LoRA path, `llama2_jax.training.lora_run.lora_run` + `Trainable.jit_steps` (adapters and their AdamW state
only; the base frozen in --param_dtype and passed to the step as its frozen tree). Both steps are AOT-compiled, run --warmup times,
then timed alternately (--steps each) so that machine noise hits both alike; the medians are reported. One line:

  python benchmarks/lora_step.py                    # CPU: dim 256, 4 layers, batch 8 x 128, rank 8
  python benchmarks/lora_step.py --dim=2048 --n_layers=22 --n_heads=32 --n_kv_heads=4 --ffn=5632 --seq=2048 \\
      --batch=8 --dtype=bfloat16 --param_dtype=bfloat16   # one GPU

Fields: full_ms / lora_ms (median step times), ratio = lora_ms / full_ms (< 1: the LoRA step is faster), the
trainable and total parameter counts, and both losses after the timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__":  # `python benchmarks/lora_step.py` from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import train_step  # noqa: E402  (benchmarks/train_step.py: the full step and the shared set-up)

from llama2_jax.model import lora  # noqa: E402
from llama2_jax.model import sharding as sh  # noqa: E402
from llama2_jax.model.config import LlamaConfig  # noqa: E402
from llama2_jax.model.llama import Llama, abstract_params  # noqa: E402
from llama2_jax.training import losses  # noqa: E402
from llama2_jax.training import state as train_state  # noqa: E402
from llama2_jax.training.lora_run import lora_run  # noqa: E402


def build_lora(cfg: LlamaConfig, mesh, lora_cfg: lora.LoraConfig, param_dtype: str, full_params):
    """(Trainable, jitted step): the base is the full side's initial params cast to `param_dtype`."""
    base_cfg = cfg.replace(param_dtype=param_dtype)
    frozen_shardings = sh.tree_shardings(abstract_params(base_cfg, boxed=True), mesh)
    frozen = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(param_dtype), p),
                     out_shardings=frozen_shardings)(full_params)
    schedule = train_state.warmup_cosine_schedule(3e-4, warmup_steps=10, total_steps=1000)
    tx = train_state.make_optimizer(schedule)  # the same optimizer as the full side
    run = lora_run(frozen, frozen_shardings, base_cfg, mesh, tx, lora_cfg, seed=0)
    step, _ = run.jit_steps(losses.next_token_loss, Llama(base_cfg), mesh, schedule=schedule, seed=0)
    return run, step


class Side:
    """A step function over its own state: `step()` runs one and returns its seconds."""
    def __init__(self, state, step, batch):
        self.state, self.batch, self.loss = state, batch, float("nan")
        self.fn = step

    def step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.fn(self.state, self.batch)
        self.loss = float(metrics["loss"])  # waits for the whole step
        return time.perf_counter() - start


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train_step.add_model_flags(parser, dim=256, n_layers=4, ffn=688, seq=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--param_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="storage dtype of the LoRA run's frozen base (the full run's params are float32)")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_targets", default=",".join(lora.ALL_TARGETS))
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one may be -1), as config.mesh")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (at least 1)")
    args = parser.parse_args(argv)
    args.mesh = tuple(int(x) for x in args.mesh.split(","))
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, hidden_dim=args.ffn, max_seq_len=args.seq, dtype=args.dtype,
                      param_dtype="float32")
    lora_cfg = lora.LoraConfig(rank=args.lora_rank, targets=args.lora_targets)
    mesh = sh.make_mesh(*args.mesh)
    batch_np = train_step.synthetic_batch(args.batch, args.seq, args.vocab, "packed")
    batch = {k: jax.device_put(v, sh.batch_sharding(mesh, v.ndim)) for k, v in batch_np.items()}
    full_state, full_step = train_step.build_ours(cfg, mesh)
    run, lora_step = build_lora(cfg, mesh, lora_cfg, args.param_dtype, full_state.params)
    full = Side(full_state, full_step.lower(full_state, batch).compile(), batch)
    adapted = Side(run.state, lora_step, batch)
    sides = (full, adapted)
    for _ in range(max(1, args.warmup)):  # the first call compiles the LoRA step
        for side in sides:
            side.step()
    times = {id(side): [] for side in sides}
    for _ in range(args.steps):
        for side in sides:
            times[id(side)].append(side.step())
    full_s, lora_s = (statistics.median(times[id(side)]) for side in sides)
    line = (f"device={train_step.device_name()} {train_step.config_text(cfg)} dtype={cfg.dtype} "
            f"base_param_dtype={args.param_dtype} batch={args.batch} seq={args.seq} rank={lora_cfg.rank} "
            f"targets={','.join(lora_cfg.targets)} full_ms={1e3 * full_s:.1f} lora_ms={1e3 * lora_s:.1f} "
            f"ratio={lora_s / full_s:.3f} trainable={lora.count(run.state.params):,} "
            f"total={lora.count(run.state.params) + lora.count(run.frozen):,} full_loss={full.loss:.3f} "
            f"lora_loss={adapted.loss:.3f}{train_step.xla_flags_text()}")
    print(line)
    return line


if __name__ == "__main__":
    main()
