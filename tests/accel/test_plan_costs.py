"""The planner's closed-form cost terms (llama2_jax.accel.estimate) against values computed by hand for a tiny model,
and the memory benchmark's compiler-checked remat choice; no compile.

The tiny model: V = 128, D = 64, L = 2, N = 4 query heads and K = 2 KV heads of H = 16, F = 192, T = 32.
  per layer: wq 64*64 + wk 64*32 + wv 64*32 + wo 64*64 + w1, w3, w2 3 * 64*192 = 49152 matmul weights, + 2 norms of 64
  P = 2 * (49152 + 128) + embedding 8192 + output 8192 + final norm 64 = 115008
  M = 2 * 49152 + output 8192 = 106496 (matmul weights)
  N_a (rank 4, seven kernels) = L r (7 D + 2 N H + 2 K H + 3 F) = 2 * 4 * (448 + 128 + 64 + 576) = 9728
  A = 4 L D T = 16384 (attention score and value products of the forward, per token)
"""

import pathlib
import sys

import pytest

from llama2_jax.accel import estimate, planner
from llama2_jax.accel import tpu as accel_tpu
from llama2_jax.accel.aot import GIB, MemoryFigure
from llama2_jax.model import lora
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import abstract_params

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import memory  # noqa: E402

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=32)
T = 32
P, M, N_A = 115008, 106496, 9728


def test_tiny_counts_are_the_hand_computed_ones():
    assert (CFG.hidden_dim, CFG.head_dim) == (192, 16)
    assert CFG.param_count() == P and CFG.matmul_param_count() == M
    assert estimate.lora_adapter_count(CFG, 4) == N_A
    # the closed form against the adapters the trainer builds
    assert lora.count(lora.abstract(abstract_params(CFG), CFG, lora.LoraConfig(rank=4, alpha=8.0))) == N_A


@pytest.mark.parametrize("task, remat, flops", [
    ("pretrain", "none", 6 * 106496 + 3 * 16384),  # 688128 = LlamaConfig.flops_per_token
    ("pretrain", "dots_no_batch", 688128 + 16384),  # the attention products recomputed
    ("pretrain", "minimal", 688128 + 2 * (106496 - 8192) + 16384),  # the blocks' forward, not the output head
    ("rm", "none", 6 * (106496 - 128 * 64 + 64) + 3 * 16384),  # score head [64, 1] instead of output [64, 128]
    ("lora", "none", 4 * 106496 + 3 * 16384 + 6 * 9728),  # no weight gradients of the base
    ("lora", "minimal", 533504 + 212992),
    ("dpo", "none", 8 * 106496 + 4 * 16384),  # policy forward + backward, reference forward
    ("dpo", "minimal", 917504 + 212992),  # only the policy's blocks are recomputed
])
def test_train_flops_per_token_closed_forms(task, remat, flops):
    assert estimate.train_flops_per_token(CFG, T, task, remat, lora_rank=4) == flops


def test_pretrain_flops_are_the_config_s():
    assert estimate.train_flops_per_token(CFG, T) == CFG.flops_per_token(T) == 688128


# mesh data=2 x fsdp=2 x tensor=2, 8 rows per step, 1 per shard: 2 micro-batches; 1e12 FLOP/s at 50 %, 1e9 B/s ICI
@pytest.mark.parametrize("task, compute, fsdp, tensor, data", [
    # 8 * 32 * 688128 FLOPs / (8 chips * 5e11); (4 + 4) P per micro-batch / t * (f-1)/f; 4 all-reduces * 2 * 2 bytes
    # * b T D per layer * (t-1)/t; 8 P / (f t) * (d-1)/d
    ("pretrain", 8 * 32 * 688128 / 4e12, 2 * 8 * P / 2 / 2 / 1e9, 2 * 2 * 4 * 4 * 32 * 64 / 2 / 1e9,
     8 * P / 4 / 2 / 1e9),
    # bfloat16 base gathered twice, only the adapters' float32 gradients reduced
    ("lora", 8 * 32 * 533504 / 4e12, 2 * (4 * P + 4 * 9728) / 2 / 2 / 1e9, 2 * 2 * 4 * 4 * 32 * 64 / 2 / 1e9,
     8 * 9728 / 4 / 2 / 1e9),
    # 8 pairs = 16 sequences; the reference gathered once more (2 P) and its forward's 2 all-reduces per layer
    ("dpo", 16 * 32 * 917504 / 4e12, 2 * 10 * P / 2 / 2 / 1e9, 2 * 2 * 6 * 4 * 2 * 32 * 64 / 2 / 1e9,
     8 * P / 4 / 2 / 1e9),
])
def test_step_seconds_terms(task, compute, fsdp, tensor, data):
    s = estimate.step_seconds(CFG, T, 8, (2, 2, 2), 1, "none", peak_flops=1e12, ici_bytes_per_s=1e9, mfu=0.5,
                              task=task, lora_rank=4)
    assert s["compute"] == pytest.approx(compute, rel=1e-12)
    assert s["fsdp"] == pytest.approx(fsdp, rel=1e-12)
    assert s["tensor"] == pytest.approx(tensor, rel=1e-12)
    assert s["data"] == pytest.approx(data, rel=1e-12)


def test_task_memory_state_terms():
    """Differences between tasks on one mesh (fsdp 2 x tensor 2: n = 4 chips share the state), bytes per chip."""
    mesh = (1, 2, 2)
    bf16 = CFG.replace(param_dtype="bfloat16")
    memory_of = lambda task, cfg=CFG, rows=1, accum=1: estimate.task_memory(  # noqa: E731
        cfg, task, T, rows, mesh, "none", accum, lora_rank=4)
    # LoRA: bfloat16 base (2 P / n) and float32 adapters with gradients and moments (16 N_a / n) instead of the 16 P / n
    # of full training, and no float32 gradient of one layer's (P - 2 V D - D) / L = 49280 weights in the backward
    assert memory_of("lora", bf16) - memory_of("pretrain", bf16) == (2 * P + 16 * N_A - 16 * P) / 4 - 4 * 49280
    # a pair is two sequences; DPO adds the float32 reference (4 P / n)
    assert memory_of("rm") == estimate.memory_formula(CFG, T, 2, 4, "none", CFG.attention_impl)["total"]
    assert memory_of("dpo") - memory_of("rm") == 4 * P / 4
    # accumulation: a float32 gradient sum of what is trained
    assert memory_of("pretrain", accum=4) - memory_of("pretrain") == 4 * P / 4
    assert memory_of("lora", bf16, accum=4) - memory_of("lora", bf16) == 4 * N_A / 4


def test_planner_ranks_dpo_with_the_reference_and_lora_below_full_training():
    cfg = LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256,
                      max_seq_len=4096, attention_impl="splash")
    target = accel_tpu.tpu_slice("v5p-8")
    cost = {task: {(c.mesh, c.rows_per_shard, c.remat): c.seconds["compute"]
                   for c in planner.enumerate_candidates(cfg, task, target, 4096, 64)}
            for task in ("pretrain", "lora", "dpo")}
    key = ((1, 4, 1), 1, "none")
    # 64 pairs are 128 sequences, each 4/3 of a training pass (the reference's forward); LoRA is 2/3 of one at 7B
    assert cost["dpo"][key] / cost["pretrain"][key] == pytest.approx(2 * 4 / 3, rel=0.01)
    assert cost["lora"][key] / cost["pretrain"][key] == pytest.approx(
        estimate.train_flops_per_token(cfg, 4096, "lora") / cfg.flops_per_token(4096))
    assert 0.6 < cost["lora"][key] / cost["pretrain"][key] < 0.75


def test_auto_remat_takes_the_next_policy_when_the_compiler_leaves_no_headroom():
    """benchmarks/memory.py's remat "auto": the closed form's pick compiled, then the next policy that recomputes
    more while the figure leaves < 10 % of the chip or is refused."""
    hbm = 95.74 * GIB
    figures = {"none": MemoryFigure(25 * GIB, 19 * GIB, 73 * GIB, 19 * GIB),  # 98 GiB: over the chip
               "dots_no_batch": MemoryFigure(error="RESOURCE_EXHAUSTED: pretend"),
               "minimal": MemoryFigure(25 * GIB, 19 * GIB, 30 * GIB, 19 * GIB)}
    tried = []
    cfg = CFG.replace(attention_impl="splash", remat_policy="none")
    chosen, figure, how = memory.compile_fitting(cfg, lambda c: (figures[c.remat_policy], c.remat_policy), hbm,
                                                 lambda c, f, h: tried.append(c.remat_policy))
    assert tried == ["none", "dots_no_batch"]  # "dots" is skipped with splash: the same program as dots_no_batch
    assert chosen.remat_policy == "minimal" and figure.total == 55 * GIB and how == "minimal"
    # a figure with >= 10 % headroom is kept as it is
    figures["none"] = MemoryFigure(25 * GIB, 19 * GIB, 40 * GIB, 19 * GIB)
    chosen, figure, _ = memory.compile_fitting(cfg, lambda c: (figures[c.remat_policy], ""), hbm, tried.append)
    assert chosen.remat_policy == "none" and figure.total == 65 * GIB
