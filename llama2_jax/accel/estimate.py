"""Closed-form estimates of one train step on a mesh: peak memory per device (`memory_formula`, the remat pick
`pick_policy`) and time (`step_seconds`, the planner's ranking cost). Crude by design; the compiler's own figures
(llama2_jax.accel.aot) are what decide whether a configuration fits.

The time model (`step_seconds`): compute + communication per optimizer step, per chip, no overlap.
  compute   training FLOPs of the global batch (`LlamaConfig.flops_per_token`: 6 N_matmul + 12 L d T per token)
            times the remat policy's recomputation factor (`RECOMPUTE`), spread over all chips at `mfu` (default 50 %)
            of the chip's peak bfloat16 FLOP/s.
  fsdp      per micro-batch, the parameters all-gathered in bfloat16 twice (forward, and again for the backward) and
            the float32 gradients reduce-scattered: (2 + 2 + 4) P (f - 1) / f bytes per chip over the fsdp ring, at the
            chip's ICI bandwidth (all links; a ring uses them all only on a torus axis it fills).
  tensor    per micro-batch and layer, four all-reduces of the [b, T, D] bfloat16 activations (attention and MLP
            outputs, forward and backward): 4 * 2 * 2 b T D (t - 1) / t bytes per chip.
  data      the float32 gradients all-reduced once per optimizer step: 2 * 4 P / f * (d - 1) / d bytes per chip.
Where it is crude: no compute/communication overlap (XLA's latency-hiding scheduler hides most FSDP gathers, so
FSDP-heavy meshes are ranked too low), a fixed MFU for every shape (small per-chip batches and tensor parallelism
lower it), no latency term (many small collectives), and the full ICI bandwidth for every ring.
"""

from __future__ import annotations

import jax.numpy as jnp

from llama2_jax.model.config import AttentionImpl, LlamaConfig, RematPolicy

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


def recompute_flops_per_token(cfg: LlamaConfig, seq: int, remat: str) -> float:
    """Forward matmul FLOPs per token recomputed in the backward pass: none for "none" and "dots" (elementwise work
    only), the attention score and value products (4 L d T of the forward's 2 N + 4 L d T) for "dots_no_batch",
    the whole forward (a third of the step's 6 N + 12 L d T) for "minimal"."""
    forward_attention = 4.0 * cfg.n_layers * cfg.dim * seq
    forward = 2.0 * cfg.matmul_param_count() + forward_attention
    return {RematPolicy.NONE.value: 0.0, RematPolicy.DOTS.value: 0.0,
            RematPolicy.DOTS_NO_BATCH.value: forward_attention, RematPolicy.MINIMAL.value: forward}[remat]


def step_seconds(cfg: LlamaConfig, seq: int, global_rows: int, mesh_shape: tuple[int, int, int], rows_per_shard: int,
                 remat: str, *, peak_flops: float, ici_bytes_per_s: float, mfu: float = 0.5) -> dict[str, float]:
    """Estimated seconds of one optimizer step by term ("compute", "fsdp", "tensor", "data") and "total"; see the
    module docstring. mesh_shape = (data, fsdp, tensor); the batch is `global_rows` sequences of `seq` tokens,
    `rows_per_shard` of them per data-parallel shard per micro-batch."""
    data, fsdp, tensor = mesh_shape
    chips = data * fsdp * tensor
    micro_batches = global_rows // (rows_per_shard * data * fsdp)
    tokens = global_rows * seq
    flops = tokens * (cfg.flops_per_token(seq) + recompute_flops_per_token(cfg, seq, remat))
    params = cfg.param_count()
    out = {"compute": flops / (chips * peak_flops * mfu)}
    out["fsdp"] = micro_batches * 8.0 * params / tensor * (fsdp - 1) / fsdp / ici_bytes_per_s
    out["tensor"] = (micro_batches * cfg.n_layers * 16.0 * rows_per_shard * seq * cfg.dim * (tensor - 1) / tensor
                     / ici_bytes_per_s)
    out["data"] = 8.0 * params / (fsdp * tensor) * (data - 1) / data / ici_bytes_per_s
    out["total"] = sum(out.values())
    return out
