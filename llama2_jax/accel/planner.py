"""The configuration search behind `python -m llama2_jax.plan`: meshes, per-shard batch, remat policy and gradient
accumulation for one model, task and TPU slice, ranked by a closed-form cost and checked by the TPU compiler.

1. Enumerate: tensor t in 1, 2, 4, 8 (dividing the chips, the query and KV heads, the FFN width and the vocabulary),
   data d in 1, 2 (pure replicas, each an fsdp group), fsdp = chips / (d t); rows per data-parallel shard b in
   1, 2, 4, 8 and accumulation n with b d f n = the global batch; every remat policy.
2. Rank by `estimate.step_seconds` (compute with the remat policy's recomputation + the mesh's communication; its
   docstring has the closed forms and says where they are crude), per task: per token, full training costs
   6 M + 12 L d T FLOPs (M matmul parameters); LoRA 4 M + 12 L d T + 6 N_a (the frozen base's activation gradients
   flow through every kernel, its weight gradients are not computed; N_a adapter parameters) and moves no base
   gradient; DPO 8 M + 16 L d T per chosen and rejected sequence (the policy's forward and backward plus the
   frozen reference's forward) and gathers the reference's weights once more; rm uses the score head's [D, 1].
3. Skip, by name and figure, the candidates whose closed-form memory (`estimate.task_memory`) exceeds `SKIP_FACTOR`
   times the chip, then compile the rest in rank order (llama2_jax.accel.aot) until
   `keep` of them fit with >= 10 % headroom or `max_compiles` were compiled. Every candidate compiled is reported
   with the compiler's figure, fitting or not. A refusal costs seconds (the TPU compiler stops at buffer
   assignment), a compile that fits minutes, hence the CLI's default of 16 compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

from llama2_jax.accel import aot, estimate
from llama2_jax.accel.tpu import TpuSlice
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import AttentionImpl, LlamaConfig, RematPolicy

PLAN_TASKS = ("pretrain", "sft", "lora", "rm", "dpo")
# Global batch per optimizer step when none is given (sequences; pairs for rm and dpo): the paper's pretraining batch
# (1024 x 4096 = 4M tokens, section 2.2), its SFT batch (64, section 3.1) for SFT and LoRA, its reward-model batch
# (512 pairs, section 3.2.2), and 64 pairs for DPO.
DEFAULT_GLOBAL_BATCH = {"pretrain": 1024, "sft": 64, "lora": 64, "rm": 512, "dpo": 64}
# The closed form overestimates what the TPU compiler needs (it budgets XLA:CPU's float32 copies; 70B on v5p-64,
# remat "dots", 1 row: 153 GiB estimated, 96.7 GiB needed), so only candidates estimated at more than twice the chip
# are skipped without a compile.
SKIP_FACTOR = 2.0
HEADROOM = 0.10


@dataclasses.dataclass
class Candidate:
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    rows_per_shard: int  # sequences (pairs for rm/dpo) per data-parallel shard per micro-batch
    grad_accum_steps: int
    remat: str
    seconds: dict  # estimate.step_seconds
    estimate_bytes: float  # closed-form peak per chip
    figure: Optional[aot.MemoryFigure] = None  # the compiler's, once compiled
    skipped: str = ""  # why it was not compiled

    def fits(self, hbm_bytes: float) -> bool:
        return self.figure is not None and not self.figure.error and self.figure.total <= (1 - HEADROOM) * hbm_bytes

    def overrides(self, task: str, global_batch: int, seq_len: int, cfg: LlamaConfig, lora_rank: int) -> str:
        data, fsdp, tensor = self.mesh
        flags = [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
                 f"--config.batch_size={global_batch}", f"--config.grad_accum_steps={self.grad_accum_steps}",
                 f"--config.seq_len={seq_len}", f"--config.model.remat_policy={self.remat}",
                 f"--config.model.attention_impl={cfg.attention_impl}", "--config.model.scan_layers=True"]
        if task == "lora":
            flags.append(f"--config.lora.rank={lora_rank}")
        return " ".join(flags)


def _divides(t: int, *sizes: int) -> bool:
    return all(size % t == 0 for size in sizes)


def meshes(cfg: LlamaConfig, chips: int) -> Iterator[tuple[int, int, int]]:
    for tensor in (1, 2, 4, 8):
        if not _divides(tensor, chips, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size):
            continue
        for data in (1, 2):
            if chips % (data * tensor) == 0:
                yield data, chips // (data * tensor), tensor


def policies(cfg: LlamaConfig) -> tuple[str, ...]:
    """The remat policies worth compiling. With splash attention "dots" and "dots_no_batch" keep the same tensors
    (the only dots with batch dimensions are attention's, which the kernel replaces; its output is recomputed under
    both), so only "dots_no_batch" is tried (measured: 70B on v5p-64 compiled to the same figures under both)."""
    if cfg.attention_impl == AttentionImpl.SPLASH.value:
        return tuple(p for p in estimate.POLICY_ORDER if p != RematPolicy.DOTS.value)
    return estimate.POLICY_ORDER


def enumerate_candidates(cfg: LlamaConfig, task: str, target: TpuSlice, seq: int, global_batch: int,
                         lora_rank: int = 16) -> list[Candidate]:
    """Every (mesh, rows per shard, accumulation, remat) that divides `global_batch`, cheapest first."""
    out = []
    gen = target.generation
    for mesh in meshes(cfg, target.chips):
        shards = mesh[0] * mesh[1]
        for rows in (1, 2, 4, 8):
            if global_batch % (rows * shards):
                continue
            for remat in policies(cfg):
                seconds = estimate.step_seconds(cfg, seq, global_batch, mesh, rows, remat, task=task,
                                                lora_rank=lora_rank, peak_flops=gen.peak_bf16_flops,
                                                ici_bytes_per_s=gen.ici_bytes_per_s)
                accum = global_batch // (rows * shards)
                out.append(Candidate(mesh, rows, accum, remat, seconds,
                                     estimate.task_memory(cfg, task, seq, rows, mesh, remat, accum, lora_rank)))
    # ties (no communication to save): fewer micro-batches, then less recomputation
    return sorted(out, key=lambda c: (c.seconds["total"], c.grad_accum_steps, estimate.POLICY_ORDER.index(c.remat)))


def plan(cfg: LlamaConfig, task: str, target: TpuSlice, devices: list, *, seq: int, global_batch: int,
         max_compiles: int = 4, keep: int = 1, lora_rank: int = 16,
         report: Callable[[Candidate], None] = lambda c: None) -> list[Candidate]:
    """Rank the candidates and compile them in order (see the module docstring); `report` is called with each one
    as it is compiled or skipped. Returns every candidate, cheapest first."""
    hbm = target.hbm_gib * aot.GIB
    candidates = enumerate_candidates(cfg, task, target, seq, global_batch, lora_rank)
    compiled = fitting = 0
    for candidate in candidates:
        if compiled >= max_compiles or fitting >= keep:
            break
        if candidate.estimate_bytes > SKIP_FACTOR * hbm:
            estimate_gib = candidate.estimate_bytes / aot.GIB
            candidate.skipped = f"closed-form estimate {estimate_gib:.1f} GiB > {SKIP_FACTOR} x HBM"
            report(candidate)
            continue
        mesh = sh.make_mesh(*candidate.mesh, devices=devices)
        candidate.figure = aot.compile_train_step(
            task, cfg.replace(remat_policy=candidate.remat), mesh, seq_len=seq,
            batch_per_device=candidate.rows_per_shard, grad_accum_steps=candidate.grad_accum_steps,
            lora_rank=lora_rank)
        compiled += 1
        fitting += candidate.fits(hbm)
        report(candidate)
    return candidates
