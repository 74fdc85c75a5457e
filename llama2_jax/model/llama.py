"""The Llama 2 model in flax.linen: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, pre-norm blocks.

Shape legend: B batch, T length, S key/value length (KV cache), D model dim, N query heads, K KV heads, H head dim,
F FFN hidden dim, V vocabulary, L layers.

Parameter tree (names follow Meta's checkpoint; kernels are [in, out] with heads split out):
  tok_embeddings/embedding [V, D]
  layers_{i}/attention_norm/scale [D]
  layers_{i}/attention/{wq [D, N, H], wk [D, K, H], wv [D, K, H], wo [N, H, D]}
  layers_{i}/ffn_norm/scale [D]
  layers_{i}/feed_forward/{w1 [D, F], w3 [D, F], w2 [F, D]}
  norm/scale [D]
  output [D, V]
With `scan_layers=True` the blocks live under `layers/...` with a leading [L] axis (see `stack_layers`).

Rotary embeddings use the **half-split** form of HF transformers (dimension i pairs with i + H/2, `rotate_half`), not
Meta's interleaved pairs: contiguous halves need no strided gathers, and HF checkpoints load without a permutation.
Meta checkpoints are permuted on conversion (convert.py) so both forms give identical attention scores.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama2_jax.model import sharding as sh
from llama2_jax.model.attention import cached_attention, dot_product_attention
from llama2_jax.model.config import LlamaConfig, RematPolicy

Array = jax.Array
LayerCache = dict  # one layer's KV cache {"k": [B, K, H, S], "v": [B, K, S, H]}: see KV_CACHE_AXES

# The KV cache layout of one layer, heads-major with keys stored transposed, so that both attention products over
# the cache are batched matmuls in XLA's canonical operand layout (attention.cached_attention). With the [B, S, K, H]
# layout of Meta's code, XLA:CPU transposes every layer's whole cache at every decode step (measured).
KV_CACHE_AXES = {"k": (sh.BATCH, sh.KV_HEADS, sh.HEAD_DIM, sh.LENGTH),
                 "v": (sh.BATCH, sh.KV_HEADS, sh.LENGTH, sh.HEAD_DIM)}

_INIT_STD = 0.02  # HF's initializer_range; the paper does not state its init

REMAT_POLICIES = {
    RematPolicy.DOTS.value: jax.checkpoint_policies.checkpoint_dots,
    RematPolicy.DOTS_NO_BATCH.value: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    RematPolicy.MINIMAL.value: jax.checkpoint_policies.nothing_saveable,
}


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init=None):
    init = init or nn.initializers.normal(_INIT_STD)
    dtype = jnp.dtype(module.config.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


LORA = "lora"  # variable collection of LoRA adapters (lora.py), laid out like "params"; absent = the plain model
LORA_DROPOUT_RNG = "lora_dropout"  # rng stream that switches on dropout of the adapters' input (training)


def adapted_project(module: nn.Module, name: str, x: Array, kernel: Array, n_in: int = 1) -> Array:
    """`project(x, kernel)`, plus the LoRA term `project(project(dropout(x), a), b)` when the "lora" collection holds
    {"a": [*in, r], "b": [r, *out]} for this kernel (b arrives scaled by alpha / r: lora.apply). The frozen kernel
    is used as given; dropout (rate `config.lora_dropout`) applies only when a "lora_dropout" rng is passed."""
    y = project(x, kernel, n_in)
    if not module.has_variable(LORA, name):
        return y
    adapter = module.get_variable(LORA, name)
    rate = module.config.lora_dropout
    if rate > 0 and module.has_rng(LORA_DROPOUT_RNG):
        keep = jax.random.bernoulli(module.make_rng(LORA_DROPOUT_RNG), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    low_rank = project(x, adapter["a"].astype(x.dtype), n_in)  # [..., r]
    return y + project(low_rank, adapter["b"].astype(x.dtype)).astype(y.dtype)


def project(x: Array, kernel: Array, n_in: int = 1, preferred_element_type=None) -> Array:
    """x [..., *in] times kernel [*in, *out] -> [..., *out], computed as ONE 2-D matmul [rows, in] @ [in, out].

    Same math as `einsum("BTD,DF->BTF")`, but XLA:CPU runs the gradient of the 3-D form (a weight gradient that
    contracts over both B and T) about 1.5x slower than the flattened one (measured: SwiGLU forward+backward at
    dim 512, 2048 tokens: 297 ms vs 192 ms). Merging the leading dims is free on every backend and keeps a
    batch-split sharding (B is the major dim)."""
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    rows = x.reshape(-1, math.prod(in_shape))
    y = jnp.matmul(rows, kernel.reshape(math.prod(in_shape), -1), preferred_element_type=preferred_element_type)
    return y.reshape(lead + out_shape)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, statistics in float32, cast back to x's dtype before the gain (as Meta)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (x.shape[-1],), (sh.EMBED,), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> Array:
    """f_i = theta^(-2i/H) for i = 0 .. H/2-1, float32 [H/2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Half-split rotary embedding. x [B, T, n, H], positions [B, T] int -> same shape and dtype as x (float32 math)."""
    head_dim = x.shape[-1]
    angles = positions[:, :, None].astype(jnp.float32) * rope_frequencies(head_dim, theta)  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache (decoding: llama2_jax.inference.decode)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache: Optional[LayerCache] = None, cache_index=None):
        """x [B, T, D]; positions, segment_ids [B, T]; layer_cache {"k", "v"} (KV_CACHE_AXES) or None;
        cache_index: the slot of x's first token in the cache, a scalar int (every row) or [B] int (one per row).
        Returns ([B, T, D], new layer cache or None)."""
        cfg = self.config
        d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dtype = jnp.dtype(cfg.dtype)
        wq = _param(self, "wq", (d, n, h), (sh.EMBED, sh.HEADS, sh.HEAD_DIM)).astype(dtype)
        wk = _param(self, "wk", (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM)).astype(dtype)
        wv = _param(self, "wv", (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM)).astype(dtype)
        wo = _param(self, "wo", (n, h, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED)).astype(dtype)

        q = apply_rope(adapted_project(self, "wq", x, wq), positions, cfg.rope_theta)  # [B, T, N, H]
        key = apply_rope(adapted_project(self, "wk", x, wk), positions, cfg.rope_theta)  # [B, T, K, H]
        value = adapted_project(self, "wv", x, wv)

        if layer_cache is None:
            out = dot_product_attention(q, key, value, impl=cfg.attention_impl, q_segment_ids=segment_ids,
                                        kv_segment_ids=segment_ids, block_size=cfg.attention_block_size,
                                        kv_block_size=cfg.attention_kv_block_size,
                                        interpret=cfg.attention_interpret)
            new_cache = None
        else:
            out = cached_attention(q, key, value, layer_cache["k"].astype(dtype), layer_cache["v"].astype(dtype),
                                   cache_index)
            new_cache = {}  # written after the reads above, so that XLA can update the buffers in place
            for name, new in (("k", key.transpose(0, 2, 3, 1)), ("v", value.transpose(0, 2, 1, 3))):  # KV_CACHE_AXES
                new_cache[name] = write_cache(layer_cache[name], new, cache_index, cache_length_axis(name))
        return adapted_project(self, "wo", out, wo, n_in=2), new_cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        w1 = _param(self, "w1", (cfg.dim, cfg.hidden_dim), (sh.EMBED, sh.MLP)).astype(dtype)
        w3 = _param(self, "w3", (cfg.dim, cfg.hidden_dim), (sh.EMBED, sh.MLP)).astype(dtype)
        w2 = _param(self, "w2", (cfg.hidden_dim, cfg.dim), (sh.MLP, sh.EMBED)).astype(dtype)
        gate = jax.nn.silu(adapted_project(self, "w1", x, w1))  # [B, T, F]
        up = adapted_project(self, "w3", x, w3)
        return adapted_project(self, "w2", gate * up, w2)


class Block(nn.Module):
    """Pre-norm transformer block: h = x + Attn(norm(x)); out = h + FFN(norm(h))."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache=None, cache_index=None):
        x = sh.constrain(x, (sh.BATCH, sh.LENGTH, None))  # the residual stream: batch-sharded, replicated over tensor
        attn_out, new_cache = Attention(self.config, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), positions, segment_ids, layer_cache, cache_index)
        h = x + attn_out
        out = h + FeedForward(self.config, name="feed_forward")(RMSNorm(self.config, name="ffn_norm")(h))
        return out, new_cache


def _block_class(cfg: LlamaConfig):
    if cfg.remat_policy == RematPolicy.NONE.value:
        return Block
    # prevent_cse is only needed outside scan (scan already stops XLA from merging recomputation away).
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


def run_trunk(cfg: LlamaConfig, tokens, positions, segment_ids):
    """Embeddings -> L blocks -> final norm, inside the calling module's `nn.compact` (so the parameter names are
    the caller's: Llama and the reward model share the trunk's names). Returns hidden [B, T, D].
    (Decoding with a KV cache runs the same blocks one by one: llama2_jax.inference.decode.decode_forward.)"""
    embedding = nn.Embed(cfg.vocab_size, cfg.dim, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD),
                                                                     (sh.VOCAB, sh.EMBED)),
                         name="tok_embeddings")
    x = embedding(tokens)
    block_cls = _block_class(cfg)
    if cfg.scan_layers:
        scanned = nn.scan(block_cls, variable_axes={"params": 0, LORA: 0},
                          split_rngs={"params": True, LORA_DROPOUT_RNG: True},
                          in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                          metadata_params={nn.PARTITION_NAME: sh.LAYERS})
        x, _ = scanned(cfg, name="layers")(x, positions, segment_ids)
    else:
        for i in range(cfg.n_layers):
            x, _ = block_cls(cfg, name=f"layers_{i}")(x, positions, segment_ids)
    return RMSNorm(cfg, name="norm")(x)


def default_positions(tokens: Array, cache_index=None) -> Array:
    """[B, T] positions 0..T-1, offset when decoding by cache_index (a scalar, or [B]: one offset per row)."""
    start = 0 if cache_index is None else jnp.reshape(jnp.asarray(cache_index, jnp.int32), (-1, 1))  # [1 or B, 1]
    return jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Llama(nn.Module):
    """Llama 2 causal language model. `apply(params, tokens, ...)` returns float32 logits [B, T, V]."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
                 return_hidden: bool = False):
        """tokens [B, T] int; positions [B, T] (default 0..T-1, per-document positions for packed rows);
        segment_ids [B, T] (None = one document per row).

        Returns logits [B, T, V] float32, or the final-norm hidden states [B, T, D] with `return_hidden`.
        Decoding with a KV cache: llama2_jax.inference.decode (the same blocks and parameters)."""
        cfg = self.config
        if positions is None:
            positions = default_positions(tokens)
        hidden = run_trunk(cfg, tokens, positions, segment_ids)
        if return_hidden:
            return hidden
        kernel = _param(self, "output", (cfg.dim, cfg.vocab_size), (sh.EMBED, sh.VOCAB))
        out = project(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)  # [B, T, V]
        return sh.constrain(out, (sh.BATCH, sh.LENGTH, sh.VOCAB))


def cache_length_axis(name: str) -> int:
    """The slot axis of a per-layer cache buffer ("k" or "v", KV_CACHE_AXES)."""
    return KV_CACHE_AXES[name].index(sh.LENGTH)


def layer_cache_shape(cfg: LlamaConfig, name: str, batch: int, max_len: int) -> tuple:
    sizes = {sh.BATCH: batch, sh.KV_HEADS: cfg.n_kv_heads, sh.HEAD_DIM: cfg.head_dim, sh.LENGTH: max_len}
    return tuple(sizes[axis] for axis in KV_CACHE_AXES[name])


def write_cache(buffer: Array, new: Array, cache_index, axis: int) -> Array:
    """buffer (one layer's "k" or "v", KV_CACHE_AXES) with `new` (same layout, T slots) written at slots
    cache_index .. cache_index + T - 1 along `axis`: a scalar index (every row; an in-place dynamic-update-slice) or
    [B] indices (one per row, for decode slots at different positions)."""
    new = new.astype(buffer.dtype)
    cache_index = jnp.asarray(cache_index, jnp.int32)
    if cache_index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, cache_index, axis=axis)
    write_row = lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=axis - 1)
    return jax.vmap(write_row)(buffer, new, cache_index)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Unrolled params (layers_0 … layers_{L-1}) -> scanned params (`layers` with a leading [L] axis)."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Scanned params -> unrolled params (inverse of `stack_layers`)."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return params


def abstract_params(cfg: LlamaConfig, boxed: bool = False) -> Any:
    """Parameter shapes/dtypes without allocating anything (`jax.eval_shape`). `boxed` keeps logical-axis boxes."""
    model = Llama(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(functools.partial(model.init, return_hidden=False), jax.random.PRNGKey(0), tokens)
    shapes = shapes["params"]
    return shapes if boxed else nn.unbox(shapes)
