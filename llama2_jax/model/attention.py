"""Attention kernels behind one function, and the masks they share.

Shape legend: B batch, T query length, S key/value length, N query heads, K key/value heads, R = N / K query heads per
KV head (GQA group), H head dim.

Masking is expressed with *slots*, not RoPE positions: query t sits at slot `q_offset + t` of the key/value buffer
and may attend to key slot s when s <= q_offset + t (causal) and both carry the same segment id (packed sequences;
segment 0 is padding and only attends to padding, so no row is ever fully masked). During decoding the key/value
buffer is the preallocated KV cache (`cached_attention`), and `q_offset` is the slot of the first new token; later
slots are unwritten or stale and are masked.

Implementations (`AttentionImpl`): "xla" (einsum + float32 softmax, the reference; everywhere), "chunked" (the same
math over blocks of queries, each block recomputed in the backward pass, so no [B, N, T, S] tensor is ever live:
memory-lean training anywhere XLA runs) and "cudnn" (`jax.nn.dot_product_attention(implementation="cudnn")`, flash
attention on NVIDIA GPUs). A TPU splash kernel fits the same signature: it takes segment ids natively.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from llama2_jax.model.config import AttentionImpl

Array = jax.Array


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    q_offset: Optional[Array] = None,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
) -> Array:
    """Boolean mask [B, 1, T, S]: True where query t may attend to key s (causal by slot, same segment)."""
    offset = jnp.zeros((batch,), jnp.int32) if q_offset is None else jnp.broadcast_to(q_offset, (batch,))
    q_slot = offset[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]  # [B, T]
    kv_slot = jnp.arange(kv_len, dtype=jnp.int32)
    mask = kv_slot[None, None, :] <= q_slot[:, :, None]  # [B, T, S]
    if q_segment_ids is not None:
        if kv_segment_ids is None:
            raise ValueError("kv_segment_ids are required when q_segment_ids are given")
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask[:, None, :, :]


def xla_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Reference attention. q [B,T,N,H], k/v [B,S,K,H], mask [B,1,T,S] bool -> [B,T,N,H] in q's dtype.

    Scores are accumulated and soft-maxed in float32 (as Meta), then cast back to the value dtype.
    """
    batch, q_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    # Head h = k * R + r uses KV head k = h // R: repeat-interleave semantics, as Meta's repeat_kv.
    q = q.reshape(batch, q_len, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("BTKRH,BSKH->BKRTS", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(mask[:, :, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKRTS,BSKH->BTKRH", probs, v)
    return out.reshape(batch, q_len, n_heads, head_dim)


def chunked_attention(
    q: Array,
    k: Array,
    v: Array,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    *,
    block_size: int = 512,
) -> Array:
    """`xla_attention` with its mask, one block of `block_size` queries at a time (`lax.map`); every block attends to
    all S keys, so each output row is computed by exactly the reference's operations.

    q [B, T, N, H], k/v [B, S, K, H], segment ids [B, T] / [B, S] or None -> [B, T, N, H] in q's dtype.

    Each block is a `jax.checkpoint`: the forward pass keeps only the block's queries, and the backward pass
    recomputes that block's float32 scores and probabilities, so at most [B, N, block_size, S] of them are live
    instead of [B, N, T, S]. T need not divide by block_size: the queries are padded with segment-0 rows (their
    outputs are dropped, so they get no gradient)."""
    batch, q_len, n_heads, head_dim = q.shape
    kv_len = k.shape[1]
    block = min(block_size, q_len)
    n_blocks = -(-q_len // block)
    pad = n_blocks * block - q_len
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        if q_segment_ids is not None:
            q_segment_ids = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))
    q_blocks = q.reshape(batch, n_blocks, block, n_heads, head_dim).swapaxes(0, 1)  # [n_blocks, B, block, N, H]
    seg_blocks = None if q_segment_ids is None else q_segment_ids.reshape(batch, n_blocks, block).swapaxes(0, 1)
    offsets = jnp.arange(n_blocks, dtype=jnp.int32) * block  # slot of each block's first query

    @jax.checkpoint  # default policy: save nothing of the block, recompute it in the backward pass
    def one_block(q_block, offset, seg_block):
        mask = attention_mask(batch, block, kv_len, offset, seg_block, kv_segment_ids)
        return xla_attention(q_block, k, v, mask)

    out = jax.lax.map(lambda xs: one_block(*xs), (q_blocks, offsets, seg_blocks))  # [n_blocks, B, block, N, H]
    return out.swapaxes(0, 1).reshape(batch, n_blocks * block, n_heads, head_dim)[:, :q_len]


def cached_attention(q: Array, k: Array, v: Array, k_cache: Array, v_cache: Array, q_offset: Array) -> Array:
    """Attention of T new tokens over the KV cache *before* their write, plus themselves.

    Args:
      q: [B, T, N, H] queries of the new tokens (query t at slot q_offset + t), rotated.
      k, v: [B, T, K, H] their keys (rotated) and values.
      k_cache: [B, K, H, S] and v_cache: [B, K, S, H] (model.KV_CACHE_AXES); slots < q_offset are attended, later
        slots are ignored.
      q_offset: scalar int (every row), or [B] int (one offset per row: decode slots at different positions).
    Returns [B, T, N, H] in q's dtype; float32 scores and softmax as `xla_attention`. Equal to causal attention over
    the cache with k, v written at slots q_offset .. q_offset + T - 1.

    Why not attend to the cache after the write: inside the decode loop XLA then needs the written cache twice (as
    the loop output and as the attention operand) and copies every layer's cache at every step (measured on CPU).
    The layouts make both products batched matmuls over (B, K) in XLA's canonical form, read in place."""
    batch, q_len, n_heads, head_dim = q.shape
    n_kv, kv_len = k_cache.shape[1], k_cache.shape[3]
    group = n_heads // n_kv
    neg = jnp.finfo(jnp.float32).min
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
    q = q.reshape(batch, q_len, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, R, T, H], h = k * R + r
    k = k.transpose(0, 2, 1, 3).astype(k_cache.dtype)  # [B, K, U, H], U = T new keys
    v = v.transpose(0, 2, 1, 3).astype(v_cache.dtype)
    old = jnp.einsum("BKRTH,BKHS->BKRTS", q, k_cache, preferred_element_type=jnp.float32) * scale
    old = jnp.where(jnp.arange(kv_len) < jnp.reshape(q_offset, (-1, 1, 1, 1, 1)), old, neg)  # [B or 1, 1, 1, 1, 1]
    new = jnp.einsum("BKRTH,BKUH->BKRTU", q, k, preferred_element_type=jnp.float32) * scale
    new = jnp.where(jnp.tril(jnp.ones((q_len, q_len), bool)), new, neg)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v_cache.dtype)
    # the two partial sums are added in float32, so that a bfloat16 cache rounds once, as `xla_attention` does
    out = (jnp.einsum("BKRTS,BKSH->BKRTH", probs[..., :kv_len], v_cache, preferred_element_type=jnp.float32)
           + jnp.einsum("BKRTU,BKUH->BKRTH", probs[..., kv_len:], v, preferred_element_type=jnp.float32))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, n_heads, head_dim).astype(q.dtype)


def cudnn_attention(q: Array, k: Array, v: Array, mask: Optional[Array], implementation: Optional[str] = "cudnn"):
    """`jax.nn.dot_product_attention` (GQA native). With mask=None it uses the fused causal kernel.

    `implementation=None` lets JAX pick (XLA on CPU); tests use that to check the mask semantics here.
    """
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    impl: str = AttentionImpl.XLA.value,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    block_size: int = 512,
) -> Array:
    """Causal (optionally segment-masked) self-attention with grouped KV heads, training and full forward passes
    (attention over a KV cache is `cached_attention`).

    Args:
      q: [B, T, N, H] queries, already rotated.
      k, v: [B, T, K, H] keys (rotated) and values.
      impl: an `AttentionImpl` value.
      q_segment_ids: [B, T] int, document id of each query token (0 = padding); None = one document.
      kv_segment_ids: [B, T] int, the same for keys.
      block_size: queries per block of the "chunked" implementation (ignored by the others).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    if impl == AttentionImpl.CUDNN.value:
        plain_causal = q_segment_ids is None and q_len == kv_len
        mask = None if plain_causal else attention_mask(batch, q_len, kv_len, None, q_segment_ids, kv_segment_ids)
        return cudnn_attention(q, k, v, mask)
    if impl == AttentionImpl.CHUNKED.value:
        return chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, block_size=block_size)
    if impl != AttentionImpl.XLA.value:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {[i.value for i in AttentionImpl]}")
    mask = attention_mask(batch, q_len, kv_len, None, q_segment_ids, kv_segment_ids)
    return xla_attention(q, k, v, mask)
