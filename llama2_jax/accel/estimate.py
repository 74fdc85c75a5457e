"""Closed-form estimates of one train step on a mesh: peak memory per device (`memory_formula`, the remat pick
`pick_policy`) and time (`step_seconds`, the planner's ranking cost). Crude by design; the compiler's own figures
(llama2_jax.accel.aot) are what decide whether a configuration fits.

The time model (`step_seconds`): compute + communication per optimizer step, per chip, no overlap. Notation: P
parameters, M matmul parameters (`LlamaConfig.matmul_param_count`: all but the embedding and the norms; the output
head V D included), L layers, d model dim, T tokens per sequence, N_a LoRA adapter parameters (`lora_adapter_count`),
f / t / d' the fsdp / tensor / data axes.
  compute   FLOPs of the global batch (`train_flops_per_token` per token of every sequence through the model) at
            `mfu` (default 50 %) of the chips' peak bfloat16 FLOP/s. Per token, with A = 4 L d T the attention score
            and value products of the forward (their backward is 2 A):
              pretrain, sft, ppo  6 M + 3 A (forward 2 M + A; backward 2 M for the activation gradients, 2 M for the
                                  weight gradients, 2 A)
              rm                  the same with the score head [D, 1] in place of the output head: M - V d + d
              lora                4 M + 3 A + 6 N_a: the frozen base's activation gradients still flow through
                                  every kernel (2 M), its weight-gradient matmuls (2 M) are not computed; the
                                  adapters' forward, input- and weight-gradient matmuls are 2 N_a each
              dpo                 8 M + 4 A per sequence, chosen and rejected alike: the policy's 6 M + 3 A plus
                                  the frozen reference's forward 2 M + A
            plus the forward the remat policy recomputes (`recompute_flops_per_token`, the trained model's blocks
            only: the reference's forward saves nothing, the output head is outside the remat'ed blocks).
  fsdp      per micro-batch, bfloat16 weights all-gathered for every forward and backward and the float32 gradients
            of the trained weights reduce-scattered, over the fsdp ring ((f - 1) / f of each, every tensor-parallel
            shard gathering its 1 / t), at the chip's ICI bandwidth (all links; a ring uses them all only on a
            torus axis it fills): full training (2 + 2 + 4) P; lora (2 + 2) P + 4 N_a (no base gradient);
            dpo (2 + 2 + 4) P + 2 P (the reference, gathered once for its forward).
  tensor    per micro-batch and layer, two all-reduces of the [b, T, D] bfloat16 activations per forward (attention
            and MLP outputs) and two per backward: 4 * 2 * 2 b T D (t - 1) / t bytes per chip, b the sequences per
            shard; dpo adds the reference's two forward all-reduces (6 instead of 4).
  data      the float32 gradients of the trained weights all-reduced once per optimizer step:
            2 * 4 W / (f t) * (d' - 1) / d' bytes per chip, W = P (N_a for lora).
Where it is crude: no compute/communication overlap (XLA's latency-hiding scheduler hides most FSDP gathers, so
FSDP-heavy meshes are ranked too low), a fixed MFU for every shape (small per-chip batches and tensor parallelism
lower it), no latency term (many small collectives), and the full ICI bandwidth for every ring.
"""

from __future__ import annotations

import jax.numpy as jnp

from llama2_jax.model.config import AttentionImpl, LlamaConfig, RematPolicy

PAIR_TASKS = ("rm", "dpo")  # one row is a preference pair: two sequences through the model
# Policies from least to most recomputation; "auto" takes the first whose formula fits the budget.
POLICY_ORDER = (RematPolicy.NONE.value, RematPolicy.DOTS.value, RematPolicy.DOTS_NO_BATCH.value,
                RematPolicy.MINIMAL.value)


def memory_formula(cfg: LlamaConfig, seq: int, batch_per_device: int, n_devices: int, remat: str,
                   attention: str = "xla") -> dict[str, float]:
    """Estimated peak bytes per device of one FSDP train step, by term (and "total").

    Notation: P parameters, n devices (every parameter has a model-dim axis sharded over fsdp, so state divides by n),
    b rows per device of T tokens, L layers, D model dim, F FFN width, N query heads, K KV heads, H head dim, V vocab,
    a = bytes of the compute dtype (2 for bfloat16). Activations are per device (the batch is split, the model dims
    are not: fsdp gathers the weights, not the activations).
    """
    P, n = cfg.param_count(), n_devices
    b, T, L, D, F = batch_per_device, seq, cfg.n_layers, cfg.dim, cfg.hidden_dim
    N, K, H, V = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    a = jnp.dtype(cfg.dtype).itemsize
    tokens = b * T
    scores = b * N * T * T  # attention score elements of one layer (the reference kernel materialises them)
    flash = attention != "xla"  # cuDNN or chunked: no [B, N, T, T] tensor is kept for the backward pass
    # chunked recomputes one block of queries at a time: its scores, probabilities and their gradients are live
    block_scores = b * N * min(cfg.attention_block_size, T) * T if attention == AttentionImpl.CHUNKED.value else 0

    out = {}
    # --- training state: float32, sharded over all n devices (ZeRO-3) ---
    out["params"] = 4.0 * P / n  # master weights
    out["grads"] = 4.0 * P / n  # float32 gradients, live from the backward pass until the update
    out["adam"] = 8.0 * P / n  # first and second moments
    # (the update is elementwise and fuses; donation makes the new state reuse the old state's buffers)

    # --- activations saved for the backward pass, per layer and token, by remat policy ---
    block_input = D * a  # the scan carry: every policy keeps each layer's input [b, T, D]
    weight_dots = (N * H + 2 * K * H + D + 2 * F + D) * a  # q, k, v, wo out, w1 out, w3 out, w2 out (no batch dims)
    attention_dots = (0 if flash else N * T * 4) + N * H * a  # scores q.k (float32) and probs.v (batch-dim dots)
    # everything else the VJPs need: the two norm outputs, rotated q and k, softmax probabilities (float32 and the
    # bfloat16 copy), silu(w1 x) and silu(w1 x) * w3 x
    elementwise = 2 * D * a + (N + K) * H * a + (0 if flash else N * T * (4 + a)) + 2 * F * a
    per_token_layer = {
        RematPolicy.MINIMAL.value: block_input,
        RematPolicy.DOTS_NO_BATCH.value: block_input + weight_dots,
        RematPolicy.DOTS.value: block_input + weight_dots + attention_dots,
        RematPolicy.NONE.value: block_input + weight_dots + attention_dots + elementwise,
    }[remat]
    out["saved_activations"] = float(L * tokens * per_token_layer)

    # --- transient working sets (one at a time) ---
    # backward of one layer: its forward is recomputed whole (what the policy did not keep), plus the gradients of
    # the attention scores and probabilities (float32) and a float32 copy of the activation gradient
    full_layer = block_input + weight_dots + attention_dots + elementwise
    layer_backward = tokens * full_layer + (block_scores if flash else scores) * 8 + tokens * D * 4
    # fsdp: one layer's weights all-gathered (bfloat16, double-buffered for prefetch) and its float32 gradient
    # before the reduce-scatter
    layer_params = (cfg.param_count() - 2 * V * D - D) / L
    fsdp_buffers = layer_params * (2 * a + 4)
    out["layer_backward"] = float(layer_backward + fsdp_buffers)
    # the loss: float32 logits, their exp/softmax and their gradient, [b, T, V] each
    out["logits"] = 3.0 * tokens * V * 4
    out["total"] = sum(out.values())
    return out


def pick_policy(cfg: LlamaConfig, seq: int, batch_per_device: int, n_devices: int, budget_bytes: float,
                attention: str = "xla") -> str:
    """The least-recomputing policy whose formula total fits the budget (the most frugal one if none does)."""
    for policy in POLICY_ORDER:
        if memory_formula(cfg, seq, batch_per_device, n_devices, policy, attention)["total"] <= budget_bytes:
            return policy
    return POLICY_ORDER[-1]


def lora_adapter_count(cfg: LlamaConfig, rank: int) -> int:
    """Parameters of rank-`rank` adapters on all seven kernels (A [in, r] and B [r, out] each):
    N_a = L r (7 D + 2 N H + 2 K H + 3 F) (wq, wk, wv, wo, w1, w3, w2: every kernel has D on one side)."""
    D, F, N, K, H = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return cfg.n_layers * rank * (7 * D + 2 * N * H + 2 * K * H + 3 * F)


def task_memory(cfg: LlamaConfig, task: str, seq: int, rows: int, mesh: tuple[int, int, int], remat: str,
                grad_accum_steps: int = 1, lora_rank: int = 16) -> float:
    """`memory_formula` per chip with the task's state, bytes. n = fsdp x tensor chips share the state; rm/dpo rows
    are pairs (two sequences).
      lora   the frozen base in cfg.param_dtype (bfloat16: 2 P / n) with no gradient or Adam moments, the adapters
             with float32 weights, gradients and moments (16 N_a / n), and no float32 weight gradient of the layer
             in the backward's working set;
      dpo    the policy as full training plus the frozen float32 reference (4 P / n); the reference's forward saves
             no activations;
      accumulation (grad_accum_steps > 1) adds the float32 running sum of the trained parameters' gradients."""
    data, fsdp, tensor = mesh
    n = fsdp * tensor
    sequences = rows * (2 if task in PAIR_TASKS else 1)
    terms = memory_formula(cfg, seq, sequences, n, remat, cfg.attention_impl)
    params = cfg.param_count() / n
    total = terms["total"]
    if task == "lora":
        adapters = lora_adapter_count(cfg, lora_rank) / n
        layer_params = (cfg.param_count() - 2 * cfg.vocab_size * cfg.dim - cfg.dim) / cfg.n_layers
        total += (jnp.dtype(cfg.param_dtype).itemsize * params + 16.0 * adapters
                  - terms["params"] - terms["grads"] - terms["adam"] - 4.0 * layer_params)
        trained = adapters
    else:
        trained = params
        if task == "dpo":
            total += 4.0 * params
    if grad_accum_steps > 1:
        # the scan's running sum of the micro-batches' gradients; the TPU compiler needed about twice that more
        # (7B on v5p-8, remat dots_no_batch: +12.2 GiB rm, +15.8 GiB dpo, against this term's 6.28)
        total += 4.0 * trained
    return total


def recompute_flops_per_token(cfg: LlamaConfig, seq: int, remat: str) -> float:
    """Forward matmul FLOPs per token recomputed in the backward pass (remat wraps the transformer blocks, not the
    output head): none for "none" and "dots" (elementwise work only), the attention score and value products
    (A = 4 L d T) for "dots_no_batch", the blocks' whole forward 2 (M - V d) + A for "minimal"."""
    forward_attention = 4.0 * cfg.n_layers * cfg.dim * seq
    blocks = 2.0 * (cfg.matmul_param_count() - cfg.vocab_size * cfg.dim) + forward_attention
    return {RematPolicy.NONE.value: 0.0, RematPolicy.DOTS.value: 0.0,
            RematPolicy.DOTS_NO_BATCH.value: forward_attention, RematPolicy.MINIMAL.value: blocks}[remat]


def train_flops_per_token(cfg: LlamaConfig, seq: int, task: str = "pretrain", remat: str = RematPolicy.NONE.value,
                          lora_rank: int = 16) -> float:
    """FLOPs of one training step per token of each sequence through the model; the closed forms are in the module
    docstring (pretrain: `LlamaConfig.flops_per_token`, 6 M + 12 L d T)."""
    matmul = float(cfg.matmul_param_count())
    attention = 4.0 * cfg.n_layers * cfg.dim * seq
    recompute = recompute_flops_per_token(cfg, seq, remat)
    if task == "lora":
        return 4.0 * matmul + 3.0 * attention + 6.0 * lora_adapter_count(cfg, lora_rank) + recompute
    if task == "rm":
        matmul += cfg.dim - cfg.vocab_size * cfg.dim  # ScoreModel: score_head [D, 1] instead of output [D, V]
    full = 6.0 * matmul + 3.0 * attention + recompute
    return full + (2.0 * matmul + attention if task == "dpo" else 0.0)


def step_seconds(cfg: LlamaConfig, seq: int, global_rows: int, mesh_shape: tuple[int, int, int], rows_per_shard: int,
                 remat: str, *, peak_flops: float, ici_bytes_per_s: float, mfu: float = 0.5, task: str = "pretrain",
                 lora_rank: int = 16) -> dict[str, float]:
    """Estimated seconds of one optimizer step by term ("compute", "fsdp", "tensor", "data") and "total"; see the
    module docstring. mesh_shape = (data, fsdp, tensor); the batch is `global_rows` rows (sequences of `seq` tokens;
    pairs, two sequences, for rm and dpo), `rows_per_shard` of them per data-parallel shard per micro-batch."""
    data, fsdp, tensor = mesh_shape
    chips = data * fsdp * tensor
    per_row = 2 if task in PAIR_TASKS else 1
    micro_batches = global_rows // (rows_per_shard * data * fsdp)
    flops = global_rows * per_row * seq * train_flops_per_token(cfg, seq, task, remat, lora_rank)
    params = float(cfg.param_count())
    trained = float(lora_adapter_count(cfg, lora_rank)) if task == "lora" else params
    gathered = {"lora": 4.0, "dpo": 6.0}.get(task, 4.0) * params  # bfloat16 bytes all-gathered per micro-batch
    activation_all_reduces = 6 if task == "dpo" else 4
    out = {"compute": flops / (chips * peak_flops * mfu)}
    out["fsdp"] = micro_batches * (gathered + 4.0 * trained) / tensor * (fsdp - 1) / fsdp / ici_bytes_per_s
    out["tensor"] = (micro_batches * cfg.n_layers * activation_all_reduces * 4.0 * rows_per_shard * per_row * seq
                     * cfg.dim * (tensor - 1) / tensor / ici_bytes_per_s)
    out["data"] = 8.0 * trained / (fsdp * tensor) * (data - 1) / data / ici_bytes_per_s
    out["total"] = sum(out.values())
    return out
