"""Decoding with a preallocated KV cache: the decode state, the one cached forward pass, and the compiled loop that
reproduces Meta's `llama/generation.py` `generate`; decode slots for a server are in `slots`.

Shape legend: B batch (or decode slots), P padded prompt width, S token buffer / KV cache length, V vocabulary,
D model dim, K KV heads, H head dim.

Meta's scheme, reproduced exactly:
  * prompts of different lengths are right-padded with `pad_id` in a buffer of
    total_len = min(max_seq_len, max_gen_len + longest prompt);
  * one prefill pass covers [0, shortest prompt); then one token per step; where a row still has a prompt token at a
    position it is kept and the sample discarded;
  * next token: argmax at temperature 0, else softmax(logits / T) then `sample_top_p` (llama2_jax.inference.sampling);
  * a row is done once it generates EOS outside its prompt; the loop exits when every row is done;
  * log-probabilities (optional) are log softmax(logits[j - 1])[token j] of the untempered logits, 0 at position 0
    and at unfilled slots.
(The host side, dropping the prompt and cutting at max_gen_len and EOS, is llama2_jax.inference.generate.)

Here the buffer has a *static* size S = min(max_seq_len, P + max_gen_len) (P is the padded prompt width, bucketed by
the host so that prompts reuse compilations) while the loop stops at Meta's *dynamic* total_len, so the results do
not depend on the padding. The prefill runs over all P columns at once (rows shorter than P write padding into cache
slots that are overwritten, before anything attends to them, by the step that fills that slot). Each step draws from
`fold_in(rng, position)`, so decoding in chunks (streaming) gives the same tokens as one call.

Speed: every cached forward pass (prefill, loop step, decode slots) is `decode_forward`: the model's own blocks
(model.Block) with one KV buffer per layer, updated in place, in a layout that attention reads without a transpose
(model.KV_CACHE_AXES, attention.cached_attention); jit it with `DECODE_COMPILER_OPTIONS` so that XLA:CPU also sees
that the update can be in place. The loop is split into a few loops over growing cache prefixes (`cache_segments`) so
that a step attends to O(position) slots rather than all S (with Meta's default max_gen_len, S is max_seq_len).

`init_decode`, `decode_steps` and `sample` are pure and work inside `jax.jit` on a sharded mesh.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding

from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, choose_next
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import (
    KV_CACHE_AXES,
    Block,
    RMSNorm,
    cache_length_axis,
    default_positions,
    layer_cache_shape,
    project,
    unstack_layers,
)
from llama2_jax.training.losses import token_logprobs

Array = jax.Array
LayerCaches = list  # one {"k": [B, K, H, S], "v": [B, K, S, H]} per layer (model.KV_CACHE_AXES)

META_PAD_ID = -1  # Llama 2's tokenizer has no pad piece
EOS_ID = 2
CACHE_SEGMENTS = 4  # decode loops over growing cache prefixes (see `cache_segments`)
SEGMENT_ROUND = 128


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries (a pytree; `state.replace(...)` for a copy with fields changed).

    In a batch decode (`init_decode`) the rows move in lockstep and pos / end are scalars; with decode slots
    (`init_slots`) every row is an independent request and pos / end are [B].
    """

    tokens: Array  # [B, S] int32: prompt + generated tokens, pad_id where unfilled
    cache: LayerCaches  # per layer {"k": [B, K, H, S], "v": [B, K, S, H]} in the compute dtype
    pos: Array  # [] or [B] int32: the next slot to fill (slots < pos - 1 are in the KV cache)
    end: Array  # [] or [B] int32: fill slots < end (Meta's total_len; per slot: prompt length + max_gen_len)
    prompt_lens: Array  # [B] int32
    done: Array  # [B] bool: the row generated EOS outside its prompt (decode slots: or the slot is free)
    rng: Array  # PRNG key; the token at slot t is drawn with fold_in(rng, t) (slots: [B] keys, one per slot)
    temperature: Array  # [] float32, 0 = greedy (slots: [B])
    top_p: Array  # [] float32 (slots: [B])
    eos_id: Array  # [] int32
    logprobs: Optional[Any] = None  # when asked for: [B, S] float32 (batch decode), `SlotLogprobs` (slots)


# ----------------------------------------------------------------------------------------------------------------------
# The cached forward pass


def kv_cache_shardings(mesh: Mesh, n_layers: int) -> LayerCaches:
    """NamedShardings of the decode KV cache (`init_layer_caches`), batch over the data axes and KV heads over
    tensor (from sharding.LOGICAL_RULES). B must divide by the data-parallel size and K by the tensor size."""
    spec = {name: NamedSharding(mesh, sh.logical_to_spec(axes)) for name, axes in KV_CACHE_AXES.items()}
    return [dict(spec) for _ in range(n_layers)]


def init_layer_caches(cfg: LlamaConfig, batch: int, max_len: int) -> LayerCaches:
    """Zeroed KV cache, one {"k": [B, K, H, S], "v": [B, K, S, H]} (model.KV_CACHE_AXES) per layer in the compute
    dtype. Separate per-layer buffers (not one stacked [L, ...] array) let XLA update each layer in place inside the
    decode loop: a stacked cache is sliced per layer and re-stacked, copying it every step."""
    return [{name: jnp.zeros(layer_cache_shape(cfg, name, batch, max_len), cfg.dtype) for name in KV_CACHE_AXES}
            for _ in range(cfg.n_layers)]


def layer_params(params: dict, cfg: LlamaConfig) -> dict:
    """Unboxed params with one `layers_{i}` entry per block (scanned params are unstacked: a copy of the blocks)."""
    params = nn.unbox(params)
    return unstack_layers(params, cfg.n_layers) if "layers" in params else params


def decode_forward(params: dict, cfg: LlamaConfig, tokens: Array, caches: LayerCaches, cache_index: Array
                   ) -> tuple[Array, LayerCaches]:
    """The model's forward pass with a per-layer KV cache, built from its own modules (model.Block, RMSNorm): the
    only cached forward pass (prefill, the decode loop and decode slots all call it).

    Args:
      params: `layer_params` output; tokens [B, T] int (valid ids); caches: `init_layer_caches`;
      cache_index: the slot (= position) of tokens[:, 0]: a scalar int for every row, or [B] int, one per row.
    Returns (final-norm hidden [B, T, D], updated caches).
    """
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(params["tok_embeddings"]["embedding"], tokens, axis=0).astype(dtype)
    positions = default_positions(tokens, cache_index)
    new_caches = []
    for i, cache in enumerate(caches):
        x, cache = Block(cfg).apply({"params": params[f"layers_{i}"]}, x, positions, None, cache, cache_index)
        new_caches.append(cache)
    return RMSNorm(cfg).apply({"params": params["norm"]}, x), new_caches


def project_logits(params: dict, hidden: Array) -> Array:
    """Final-norm hidden [..., D] -> float32 logits [..., V] (the model's output layer)."""
    return project(hidden, params["output"].astype(hidden.dtype), preferred_element_type=jnp.float32)


def model_inputs(tokens: Array, pad_id: int) -> Array:
    """Padding -> id 0 (pad_id is -1 for Llama 2, which is no row of the embedding); its outputs are never used."""
    return jnp.where(tokens == pad_id, 0, tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Batch decoding (rows in lockstep)


def _write_column(buffer: Array, column: Array, pos: Array) -> Array:
    """buffer [B, S] with column [B] written at slot pos."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None].astype(buffer.dtype), pos, axis=1)


def _place(state: DecodeState, logits: Array) -> DecodeState:
    """Choose the token at slot state.pos from logits [B, V] of the previous slot, keep prompt tokens, record the
    log-probability and EOS, and advance pos. A no-op on the buffers when pos >= end."""
    pos = state.pos
    sampled = choose_next(jax.random.fold_in(state.rng, pos), logits, state.temperature, state.top_p)
    current = jax.lax.dynamic_index_in_dim(state.tokens, pos, axis=1, keepdims=False)  # [B]
    in_prompt = pos < state.prompt_lens
    token = jnp.where(in_prompt, current, sampled)
    active = pos < state.end
    logprobs = state.logprobs
    if logprobs is not None:
        logprobs = _write_column(logprobs, jnp.where(active, token_logprobs(logits, token), 0.0), pos)
    return state.replace(tokens=_write_column(state.tokens, jnp.where(active, token, current), pos), pos=pos + 1,
                         done=state.done | (active & ~in_prompt & (token == state.eos_id)), logprobs=logprobs)


def init_decode(params: dict, cfg: LlamaConfig, prompt_tokens: Array, prompt_lens: Array, rng: Array, *,
                max_gen_len: int, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P, eos_id: int = EOS_ID,
                pad_id: int = META_PAD_ID, logprobs: bool = False, mesh: Optional[Mesh] = None) -> DecodeState:
    """Allocate the buffers, prefill [0, P) and choose the token at the shortest prompt's end.

    Args:
      prompt_tokens: [B, P] int, right-padded with pad_id (P <= cfg.max_seq_len); prompt_lens: [B] int, each >= 1.
      rng: a PRNG key; max_gen_len: static; temperature, top_p, eos_id: scalars (may be traced).
      mesh: when given, the KV cache is sharded with `kv_cache_shardings` and the token buffer over the batch.
    Returns the `DecodeState` (scalar pos, end = Meta's total_len; logprobs [B, S] when asked for).
    """
    batch, width = prompt_tokens.shape
    if width > cfg.max_seq_len:
        raise ValueError(f"prompt width {width} exceeds max_seq_len {cfg.max_seq_len}")
    size = min(cfg.max_seq_len, width + max_gen_len)
    prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
    tokens = jnp.full((batch, size), pad_id, jnp.int32).at[:, :width].set(prompt_tokens.astype(jnp.int32))
    cache = init_layer_caches(cfg, batch, size)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, kv_cache_shardings(mesh, cfg.n_layers))
        tokens = jax.lax.with_sharding_constraint(tokens, sh.batch_sharding(mesh))
    params = layer_params(params, cfg)
    hidden, cache = decode_forward(params, cfg, model_inputs(tokens[:, :width], pad_id), cache,
                                   jnp.zeros((), jnp.int32))
    min_len = jnp.min(prompt_lens)
    lp = None
    if logprobs:  # positions 1 .. min_len - 1 from the prefill (min_len itself is set by `_place`)
        lp = token_logprobs(project_logits(params, hidden[:, :-1]), tokens[:, 1:width])
        lp = jnp.where(jnp.arange(1, width) < min_len, lp, 0.0)
        lp = jnp.zeros((batch, size), jnp.float32).at[:, 1:width].set(lp)
    state = DecodeState(tokens=tokens, cache=cache, pos=min_len, prompt_lens=prompt_lens,
                        end=jnp.minimum(cfg.max_seq_len, max_gen_len + jnp.max(prompt_lens)),
                        done=jnp.zeros((batch,), bool), rng=rng, temperature=jnp.asarray(temperature, jnp.float32),
                        top_p=jnp.asarray(top_p, jnp.float32), eos_id=jnp.asarray(eos_id, jnp.int32), logprobs=lp)
    last = jax.lax.dynamic_index_in_dim(hidden, min_len - 1, axis=1, keepdims=False)  # [B, D]
    return _place(state, project_logits(params, last))


def cache_segments(size: int) -> list[int]:
    """Static cache lengths of successive decode loops: about size/8, size/4, size/2, size (multiples of 128, at
    least 128). A step at slot t runs in the first loop whose length exceeds t and attends to that many slots only,
    so attention costs O(t) rather than O(size) (Meta's default max_gen_len makes size = max_seq_len)."""
    return sorted({min(size, -(-size // (2 ** k * SEGMENT_ROUND)) * SEGMENT_ROUND) for k in range(CACHE_SEGMENTS)})


def _slice_caches(caches: LayerCaches, end: int) -> LayerCaches:
    return [{name: jax.lax.slice_in_dim(c, 0, end, axis=cache_length_axis(name)) for name, c in layer.items()}
            for layer in caches]


def _restore_caches(full: LayerCaches, prefix: LayerCaches) -> LayerCaches:
    return [{name: jax.lax.dynamic_update_slice_in_dim(c, p[name], 0, axis=cache_length_axis(name))
             for name, c in layer.items()} for layer, p in zip(full, prefix)]


def decode_steps(params: dict, cfg: LlamaConfig, state: DecodeState, *, pad_id: int = META_PAD_ID,
                 max_steps: Optional[int] = None, mesh: Optional[Mesh] = None) -> DecodeState:
    """Decode one token per step in `lax.while_loop`s (one per `cache_segments` length) until every row is done or
    pos reaches end (or after `max_steps` steps, for streaming). Each step feeds slot pos - 1 through the model."""
    params = layer_params(params, cfg)
    stop = state.end if max_steps is None else jnp.minimum(state.end, state.pos + max_steps)

    def run_segment(state: DecodeState, length: int) -> DecodeState:
        def cond(s: DecodeState):
            return (s.pos < jnp.minimum(stop, length)) & ~jnp.all(s.done)

        def body(s: DecodeState):
            prev = s.pos - 1
            fed = jax.lax.dynamic_slice_in_dim(s.tokens, prev, 1, axis=1)  # [B, 1]
            hidden, cache = decode_forward(params, cfg, model_inputs(fed, pad_id), s.cache, prev)
            if mesh is not None:
                cache = jax.lax.with_sharding_constraint(cache, kv_cache_shardings(mesh, cfg.n_layers))
            return _place(s.replace(cache=cache), project_logits(params, hidden[:, 0]))

        return jax.lax.while_loop(cond, body, state)

    size = state.tokens.shape[1]
    for length in cache_segments(size):
        if length == size:
            state = run_segment(state, length)
        else:
            prefix = run_segment(state.replace(cache=_slice_caches(state.cache, length)), length)
            state = prefix.replace(cache=_restore_caches(state.cache, prefix.cache))
    return state


def generated_lengths(state: DecodeState, max_gen_len: int) -> Array:
    """[B] number of generated tokens each row keeps after Meta's post-processing (cut to max_gen_len and before
    the first generated EOS): the response length, EOS excluded."""
    tokens, prompt_lens = state.tokens, state.prompt_lens[:, None]
    slots = jnp.arange(tokens.shape[1])[None, :]
    limit = jnp.minimum(prompt_lens + max_gen_len, state.pos)  # [B, 1]
    is_eos = (tokens == state.eos_id) & (slots >= prompt_lens) & (slots < limit)
    first_stop = jnp.min(jnp.where(is_eos, slots, limit), axis=1)
    return (first_stop - prompt_lens[:, 0]).astype(jnp.int32)


def truncated_rows(tokens, prompt_lens, lengths, max_gen_len: int, eos_id: int) -> Array:
    """[B] bool: the answer was cut by the length limit rather than ended by the model. An answer is complete only
    when an EOS directly follows its kept tokens inside its first `max_gen_len` generated slots; it is truncated when
    it reached `max_gen_len` tokens, or when no EOS follows (the buffer, S = min(max_seq_len, P + max_gen_len), ran
    out first). `sample`'s output carries it as "truncated" (equal to ~done for its own rows).

    tokens [B, S] (prompt + generated, as `sample` returns them), prompt_lens [B], lengths [B] kept answer tokens
    (EOS excluded, `generated_lengths`). Works on numpy or jax arrays, inside or outside jit."""
    tokens, prompt_lens, lengths = jnp.asarray(tokens), jnp.asarray(prompt_lens), jnp.asarray(lengths)
    end = prompt_lens + lengths  # [B] the slot after the kept answer: its EOS when it ended by itself
    inside = end < tokens.shape[1]
    at_end = jnp.take_along_axis(tokens, jnp.clip(end, 0, tokens.shape[1] - 1)[:, None], axis=1)[:, 0]
    ended = inside & (at_end == eos_id) & (lengths < max_gen_len)
    return ~ended


def sample(params: dict, cfg: LlamaConfig, prompt_tokens: Array, prompt_lens: Array, rng: Array, *,
           max_gen_len: int, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P, eos_id: int = EOS_ID,
           pad_id: int = META_PAD_ID, logprobs: bool = False, mesh: Optional[Mesh] = None) -> dict[str, Array]:
    """Generate continuations of a batch of prompts; pure and jittable (cfg, max_gen_len, pad_id, logprobs and mesh
    are static; temperature, top_p and eos_id may be traced).

    Args:
      prompt_tokens: [B, P] int, right-padded with pad_id; prompt_lens: [B] int.
    Returns:
      tokens [B, S] int32: prompt + generated tokens (pad_id where unfilled), S = min(max_seq_len, P + max_gen_len);
      prompt_lens [B]; lengths [B]: generated tokens kept by Meta's post-processing (EOS excluded);
      done [B] bool: the row generated EOS; truncated [B] bool: the answer was cut at max_gen_len or at the end
      of the buffer (`truncated_rows`); logprobs [B, S] float32 when asked for.
    """
    state = init_decode(params, cfg, prompt_tokens, prompt_lens, rng, max_gen_len=max_gen_len,
                        temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id, logprobs=logprobs,
                        mesh=mesh)
    state = decode_steps(params, cfg, state, pad_id=pad_id, mesh=mesh)
    lengths = generated_lengths(state, max_gen_len)
    out = {"tokens": state.tokens, "prompt_lens": state.prompt_lens, "done": state.done, "lengths": lengths,
           "truncated": truncated_rows(state.tokens, state.prompt_lens, lengths, max_gen_len, state.eos_id)}
    if logprobs:
        out["logprobs"] = state.logprobs
    return out


# XLA:CPU's default copy insertion cannot prove that a cache buffer read by attention and then overwritten in the
# same loop step may be updated in place, so it copies every layer's cache twice per step (measured at the 15M shape,
# batch 1: ~0.3 ms of a 2.8 ms step). Region analysis proves it. The option is CPU-only; other backends ignore it.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
SAMPLE_STATIC = ("cfg", "max_gen_len", "pad_id", "logprobs", "mesh")
sample_jit = jax.jit(sample, static_argnames=SAMPLE_STATIC,  # compiled once per (static args, B, P)
                     compiler_options=DECODE_COMPILER_OPTIONS)
init_decode_jit = jax.jit(init_decode, static_argnames=SAMPLE_STATIC, compiler_options=DECODE_COMPILER_OPTIONS)
decode_steps_jit = jax.jit(decode_steps, static_argnames=("cfg", "pad_id", "max_steps", "mesh"),
                           donate_argnames=("state",), compiler_options=DECODE_COMPILER_OPTIONS)
