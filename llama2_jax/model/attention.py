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
memory-lean training anywhere XLA runs), "cudnn" (`jax.nn.dot_product_attention(implementation="cudnn")`, flash
attention on NVIDIA GPUs) and "splash" (jax's Pallas TPU splash attention, `splash_attention`: flash attention with
block-sparse causal and segment masks, mapped over the mesh with `shard_map`).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import SPLASH_BLOCK_MULTIPLE, AttentionImpl

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


def splash_block_sizes(length: int, block_q: int, block_kv: int) -> tuple[int, int, int]:
    """(padded length, query block, key/value block) for a sequence of `length` tokens: blocks no longer than the
    sequence rounded up to the 128 lanes, and the sequence padded to a multiple of both blocks."""
    padded = -(-length // SPLASH_BLOCK_MULTIPLE) * SPLASH_BLOCK_MULTIPLE
    block_q, block_kv = min(block_q, padded), min(block_kv, padded)
    step = math.lcm(block_q, block_kv)
    return -(-padded // step) * step, block_q, block_kv


def _splash_local(q: Array, k: Array, v: Array, q_segment_ids: Optional[Array], kv_segment_ids: Optional[Array], *,
                  block_q: int, block_kv: int, interpret: bool) -> Array:
    """Splash attention on one device's shard: q [B, T, N, H], k/v [B, T, K, H], segment ids [B, T] or None."""
    batch, length, n_heads, head_dim = q.shape
    padded, block_q, block_kv = splash_block_sizes(length, block_q, block_kv)
    # The kernel does not scale the scores: scale q (in float32, rounded once to q's dtype), as MaxText does.
    q = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)
    # [B, T, n, H] -> [B, n, T', H]. The padded tail comes last, so causality already hides it from every real query
    # (and a padding query sees at least itself); with segment ids it also gets segment 0, the padding segment.
    pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    q, k, v = (jnp.pad(x.transpose(0, 2, 1, 3), pad) for x in (q, k, v))
    segments = None
    if q_segment_ids is not None:
        q_seg, kv_seg = (jnp.pad(s.astype(jnp.int32), ((0, 0), (0, padded - length))) for s in
                         (q_segment_ids, kv_segment_ids))
        segments = splash.SegmentIds(q=q_seg, kv=kv_seg)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * n_heads)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(kernel)(q, k, v, segment_ids=segments)  # [B, N, T', H]
    return out[:, :, :length].transpose(0, 2, 1, 3)


def splash_attention(q: Array, k: Array, v: Array, q_segment_ids: Optional[Array] = None,
                     kv_segment_ids: Optional[Array] = None, *, block_q: int = 512, block_kv: int = 512,
                     interpret: bool = False) -> Array:
    """Causal self-attention with jax's Pallas TPU splash attention kernel (`make_splash_mha`), forward and backward.

    q [B, T, N, H], k/v [B, T, K, H], segment ids [B, T] (0 = padding) or None -> [B, T, N, H] in q's dtype.

    - Masks: the kernel's static `CausalMask` and-ed with its `SegmentIds`, so packed documents never attend across
      (`attention_mask`'s semantics). Blocks that the mask empties are skipped, forward and backward.
    - GQA: native. The kernel reads KV head h // R for query head h from k/v of K heads (its block index maps), so
      the repeated keys and values are never materialised; MQA (K = 1) is the same call.
    - T need not divide by the blocks: the sequence is padded (`splash_block_sizes`) and the tail dropped.
    - Numerics: scores and softmax in float32 inside the kernel (online softmax, as flash attention), q pre-scaled by
      1/sqrt(H) in its own dtype, probabilities cast to v's dtype before the product with v: the reference's math
      up to the order of float32 sums and that one rounding of the scaled q (exact when sqrt(H) is a power of two).
    - Sharding: inside `sharding.activation_sharding(mesh)` (every jitted train step) the kernel runs under
      `shard_map` with the specs of `LOGICAL_RULES` (batch over data/fsdp, query and KV heads over tensor), each
      device on its own rows and heads; no collective is needed. Outside it, on the arrays as given.
    - `interpret`: run the Pallas kernel in interpret mode (any backend: CPU tests); otherwise it lowers for TPU
      only (TPU devices, or the compile-only devices of llama2_jax.accel).

    Decoding does not use this (`cached_attention` attends over the KV cache). jax also ships a TPU kernel for that,
    `pallas.ops.tpu.ragged_paged_attention`; it pays off only with a *paged* KV cache (pages shared across requests,
    ragged lengths packed into one batch, as vLLM/JetStream serve), whereas this project's cache is one dense
    [B, K, H, S] buffer per layer whose reads at one decode step are a batched matmul XLA already streams at HBM
    bandwidth. Using it would mean a paged cache and a page allocator in llama2_jax.inference.decode and the server:
    worth it for a many-user TPU server, not for the dense decode loop here.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"splash attention is self-attention: {q.shape[1]} queries but {k.shape[1]} keys")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("splash attention needs both q_segment_ids and kv_segment_ids, or neither")
    local = functools.partial(_splash_local, block_q=block_q, block_kv=block_kv, interpret=interpret)
    mesh = sh.activation_mesh()
    if mesh is None:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    q_spec = sh.logical_to_spec((sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM))
    kv_spec = sh.logical_to_spec((sh.BATCH, sh.LENGTH, sh.KV_HEADS, sh.HEAD_DIM))
    segment_spec = sh.logical_to_spec((sh.BATCH, sh.LENGTH))
    _check_splash_sharding(mesh, q.shape, k.shape, q_spec, kv_spec)
    if q_segment_ids is None:
        mapped = jax.shard_map(lambda q_, k_, v_: local(q_, k_, v_, None, None), mesh=mesh,
                               in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)
        return mapped(q, k, v)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec, segment_spec),
                           out_specs=q_spec, check_vma=False)
    return mapped(q, k, v, q_segment_ids, kv_segment_ids)


def _check_splash_sharding(mesh, q_shape, kv_shape, q_spec, kv_spec) -> None:
    """One-line ValueError when the rules table would split what splash cannot take split (the sequence or the head
    dim) or a dimension does not divide by its mesh axes."""
    for name, shape, spec in (("queries", q_shape, q_spec), ("keys/values", kv_shape, kv_spec)):
        for axis, (dim, axes) in enumerate(zip(shape, spec)):
            if axes is None:
                continue
            if axis in (1, 3):
                raise ValueError(f"splash attention cannot split the {'sequence' if axis == 1 else 'head'} axis of "
                                 f"the {name} over mesh axes {axes}: change sharding.LOGICAL_RULES")
            axes = (axes,) if isinstance(axes, str) else axes
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                what = "batch rows" if axis == 0 else "heads"
                raise ValueError(f"splash attention: {dim} {what} of the {name} do not divide over mesh axes {axes} "
                                 f"of size {size}; change the mesh or the batch")


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    impl: str = AttentionImpl.XLA.value,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    block_size: int = 512,
    kv_block_size: int = 512,
    interpret: bool = False,
) -> Array:
    """Causal (optionally segment-masked) self-attention with grouped KV heads, training and full forward passes
    (attention over a KV cache is `cached_attention`).

    Args:
      q: [B, T, N, H] queries, already rotated.
      k, v: [B, T, K, H] keys (rotated) and values.
      impl: an `AttentionImpl` value.
      q_segment_ids: [B, T] int, document id of each query token (0 = padding); None = one document.
      kv_segment_ids: [B, T] int, the same for keys.
      block_size: queries per block of the "chunked" and "splash" implementations (ignored by the others).
      kv_block_size: keys per block of "splash".
      interpret: "splash" in Pallas interpret mode (runs on any backend).
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
    if impl == AttentionImpl.SPLASH.value:
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, block_q=block_size, block_kv=kv_block_size,
                                interpret=interpret)
    if impl != AttentionImpl.XLA.value:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {[i.value for i in AttentionImpl]}")
    mask = attention_mask(batch, q_len, kv_len, None, q_segment_ids, kv_segment_ids)
    return xla_attention(q, k, v, mask)
