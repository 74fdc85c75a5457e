"""Batched log-likelihood of continuations, the numerical core of the lm-eval backend (no lm-eval import here).

A request is (context tokens, continuation tokens). As lm-eval's `hf` backend does for a causal LM, the model reads
inp = (context + continuation)[-(max_len + 1):][:-1] and the score is the sum of log softmax(logits)[target] over
the last len(continuation) positions, plus whether each of those targets is the argmax (lm-eval's `is_greedy`).

Shapes: B rows per batch (`batch_size`, rounded up to the mesh's data-parallel size), W the bucketed width, C the
scored columns, D model dim, V vocabulary. Requests are sorted by length (longest first) and batched. Rows are
LEFT-padded to W (`bucket_width`: powers of two and 1.5x powers of two) so that every continuation ends in the last
column; padding is segment 0 (attends only to padding) and positions start at 0 on each row's first real token, so a
row's numbers do not depend on its padding. Only the last C columns (the batch's longest continuation on the same
ladder of widths) go through the output layer and the log-softmax, the largest cost at Llama 2's 32000 vocabulary. Each (W, C) compiles once (`score_tokens_jit`). With a mesh, params are sharded by the one logical-axis
rules table (sharding.LOGICAL_RULES) and rows over the data axes, like the trainers.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, abstract_params, project

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)
MIN_BUCKET = 16


def bucket_width(length: int, max_len: int) -> int:
    """Padded width for a longest row of `length` tokens: the smallest of 16, 24, 32, 48, 64, 96, ... (powers of two
    and 1.5x powers of two) that holds it, capped at max_len. Few widths (few compilations), at most 1/3 padding."""
    width = MIN_BUCKET
    while True:
        for candidate in (width, width * 3 // 2):
            if candidate >= length:
                return min(candidate, max_len)
        width *= 2


def scored_columns(longest_continuation: int, width: int) -> int:
    """C: the batch's longest continuation rounded up on the `bucket_width` ladder, at most W."""
    return bucket_width(longest_continuation, width)


def model_inputs(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], list[int], int]:
    """(inputs, targets, n scored): lm-eval's left truncation to max_len + 1 tokens, shifted by one."""
    if not context or not continuation:
        raise ValueError("a request needs at least one context token and one continuation token")
    if len(continuation) > max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the {max_len}-token window "
                         "(max_seq_len): raise it with --max_length (model_arg max_length)")
    whole = (list(context) + list(continuation))[-(max_len + 1):]
    return whole[:-1], whole[1:], len(continuation)


def score_tokens(params, cfg: LlamaConfig, inputs: jax.Array, targets: jax.Array, lengths: jax.Array,
                 cont_lengths: jax.Array, columns: int) -> tuple[jax.Array, jax.Array]:
    """Left-padded inputs, targets [B, W] int32, lengths [B] (real tokens per row), cont_lengths [B] (scored
    targets, at the end of the row, <= columns) -> (log-probabilities of the targets in the last C columns [B, C]
    float32, 0 where not scored; all scored targets are the argmax [B] bool). `columns` (static) is C. The host
    sums the log-probabilities in float64, so long continuations add no float32 rounding of their own."""
    params = nn.unbox(params)
    width = inputs.shape[1]
    pad = width - lengths[:, None]  # [B, 1]
    column = jnp.arange(width)[None, :]
    positions = jnp.maximum(column - pad, 0)
    segments = (column >= pad).astype(jnp.int32)  # 0 = padding
    hidden = Llama(cfg).apply({"params": params}, inputs, positions, segments, return_hidden=True)  # [B, W, D]
    hidden = hidden[:, width - columns:]  # [B, C, D]
    logits = project(hidden, params["output"].astype(hidden.dtype), preferred_element_type=jnp.float32)  # [B, C, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    tail = targets[:, width - columns:]
    target_lp = jnp.take_along_axis(log_probs, tail[..., None], axis=-1)[..., 0]  # [B, C]
    scored = jnp.arange(columns)[None, :] >= columns - cont_lengths[:, None]
    greedy = jnp.argmax(logits, axis=-1) == tail
    return jnp.where(scored, target_lp, 0.0), jnp.all(greedy | ~scored, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "columns", "mesh"))
def score_tokens_jit(params, cfg: LlamaConfig, inputs, targets, lengths, cont_lengths, columns: int,
                     mesh: Optional[Mesh] = None):
    with sh.activation_sharding(mesh):
        return score_tokens(params, cfg, inputs, targets, lengths, cont_lengths, columns)


def shard_params(params, cfg: LlamaConfig, mesh: Optional[Mesh]):
    """Params on the devices: sharded by sharding.LOGICAL_RULES on `mesh`, or on the default device."""
    params = nn.unbox(params)
    if mesh is None:
        return jax.device_put(params)
    shardings = sh.tree_shardings(abstract_params(cfg, boxed=True), mesh)
    return jax.device_put(params, shardings)


def _batch_arrays(rows: list[tuple[list[int], list[int], int]], batch_size: int, max_len: int):
    """Left-padded (inputs, targets [B, W], lengths, cont_lengths [B]) and C for one batch; unused rows are one
    padding token long."""
    width = bucket_width(max(len(inputs) for inputs, _, _ in rows), max_len)
    columns = scored_columns(max(n for _, _, n in rows), width)
    inputs = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    cont_lengths = np.zeros((batch_size,), np.int32)
    for r, (inp, tgt, n) in enumerate(rows):
        inputs[r, width - len(inp):], targets[r, width - len(tgt):] = inp, tgt
        lengths[r], cont_lengths[r] = len(inp), n
    return (inputs, targets, lengths, cont_lengths), columns


def continuation_logprobs(params, cfg: LlamaConfig, requests: Sequence[Request], *, batch_size: int = 16,
                          mesh: Optional[Mesh] = None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) per request, in input order. params: on device already
    (`shard_params`) or host arrays."""
    if mesh is not None:
        dp = sh.data_parallel_size(mesh)
        batch_size = -(-batch_size // dp) * dp
    rows = [model_inputs(context, continuation, cfg.max_seq_len) for context, continuation in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        arrays, columns = _batch_arrays([rows[i] for i in chunk], batch_size, cfg.max_seq_len)
        if mesh is not None:
            arrays = tuple(jax.device_put(a, sh.batch_sharding(mesh, a.ndim)) for a in arrays)
        token_lps, greedy = jax.device_get(score_tokens_jit(params, cfg, *arrays, columns=columns, mesh=mesh))
        sums = np.asarray(token_lps, np.float64).sum(axis=-1)
        for row, i in enumerate(chunk):
            results[i] = (float(sums[row]), bool(greedy[row]))
    return results
