"""Decoding with a preallocated KV cache: the decode state, the one cached forward pass, and the compiled loop that
reproduces Meta's `llama/generation.py` `generate`, and decode slots for a server (prefill / insert / generate_step).

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

from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, choose_next, sample_top_p
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


# ----------------------------------------------------------------------------------------------------------------------
# Decode slots: prefill / insert / generate_step (a server's fixed batch of independent requests)
#
# A server keeps one `init_slots` state of n slots; for each new request it runs `prefill` on the prompt alone, then,
# between two `generate_step`s, `insert`s the prefix into a free slot (`free_slots`). Every slot has its own position
# (pos, end [B]), temperature, top_p and PRNG key; a step feeds each slot's last token at its own position
# (decode_forward with [B] cache indices) and attends over the whole cache (no cache segments). A slot's token at
# position t is drawn from fold_in(slot key, t): a request inserted with rng=PRNGKey(seed) draws what `sample` draws
# for its prompt alone with that seed, whatever shares the batch (tests/test_decode_slots.py). With
# init_slots(logprobs=True) each slot also records the untempered log-probability of every chosen token and the
# TOP_LOGPROBS most likely tokens at that position (OpenAI's `logprobs`).

TOP_LOGPROBS = 5  # the most likely tokens recorded per position (OpenAI's completions allow logprobs <= 5)


@struct.dataclass
class Prefix:
    """One prefilled prompt, ready to `insert` into a decode slot."""
    tokens: Array  # [P] int32: the prompt, right-padded with pad_id
    length: Array  # [] int32: the prompt length (>= 1)
    logits: Array  # [V] float32: the next-token logits after the last prompt token
    cache: LayerCaches  # per layer {"k": [1, K, H, P], "v": [1, K, P, H]}; slots >= length hold padding


@struct.dataclass
class SlotLogprobs:
    """What a slot records per position when asked for log-probabilities (position 0 and unfilled slots are 0)."""
    chosen: Array  # [B, S] float32: log softmax(logits)[token] of the untempered logits
    top_ids: Array  # [B, S, TOP_LOGPROBS] int32: the most likely tokens, most likely first
    top_values: Array  # [B, S, TOP_LOGPROBS] float32: their log-probabilities


def _prefill_hidden(params: dict, cfg: LlamaConfig, prompt_tokens: Array, pad_id: int):
    (width,) = prompt_tokens.shape
    if width > cfg.max_seq_len:
        raise ValueError(f"prompt width {width} exceeds max_seq_len {cfg.max_seq_len}")
    params = layer_params(params, cfg)
    tokens = prompt_tokens.astype(jnp.int32)
    hidden, cache = decode_forward(params, cfg, model_inputs(tokens[None], pad_id), init_layer_caches(cfg, 1, width),
                                   jnp.zeros((), jnp.int32))
    return params, tokens, hidden[0], cache


def prefill(params: dict, cfg: LlamaConfig, prompt_tokens: Array, prompt_len, *, pad_id: int = META_PAD_ID
            ) -> Prefix:
    """Run one prompt through `decode_forward`. prompt_tokens [P] int, right-padded with pad_id (bucket P to reuse
    compilations); prompt_len: [] int, 1 <= prompt_len <= P. Returns the `Prefix` (its logits and its KV cache)."""
    params, tokens, hidden, cache = _prefill_hidden(params, cfg, prompt_tokens, pad_id)
    length = jnp.asarray(prompt_len, jnp.int32)
    last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=0, keepdims=False)  # [D]
    return Prefix(tokens=tokens, length=length, logits=project_logits(params, last), cache=cache)


def top_logprobs(logits: Array, k: int = TOP_LOGPROBS) -> tuple[Array, Array]:
    """logits [..., V] -> (ids [..., k] int32, log-probabilities [..., k]), most likely first."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), values


def prompt_logprobs(params: dict, cfg: LlamaConfig, prompt_tokens: Array, *, pad_id: int = META_PAD_ID
                    ) -> SlotLogprobs:
    """The log-probabilities of a prompt's own tokens (OpenAI's echo with logprobs): prompt_tokens [P] right-padded
    with pad_id. Returns a `SlotLogprobs` of one row [1, P]: position t holds log p(token t | tokens < t), position 0
    holds 0 (no prediction); positions past the prompt hold values of the padding (cut them on the host)."""
    params, tokens, hidden, _ = _prefill_hidden(params, cfg, prompt_tokens, pad_id)
    logits = project_logits(params, hidden[:-1])  # [P - 1, V]: the prediction of positions 1 .. P - 1
    chosen = token_logprobs(logits, model_inputs(tokens[1:], pad_id))
    ids, values = top_logprobs(logits)
    pad = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x])[None]
    return SlotLogprobs(chosen=pad(chosen), top_ids=pad(ids), top_values=pad(values))


def init_slots(cfg: LlamaConfig, n_slots: int, max_len: int, rng: Array, *, temperature=DEFAULT_TEMPERATURE,
               top_p=DEFAULT_TOP_P, eos_id: int = EOS_ID, pad_id: int = META_PAD_ID, logprobs: bool = False,
               n_top: int = TOP_LOGPROBS) -> DecodeState:
    """n_slots free decode slots with a KV cache of max_len (<= max_seq_len) slots each; pos, end [n_slots].
    Every slot starts with `temperature`, `top_p` and the key fold_in(rng, slot) (`insert` may set its own);
    logprobs: record `SlotLogprobs` (in `DecodeState.logprobs`) with the n_top most likely tokens per position."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds max_seq_len {cfg.max_seq_len}")
    zeros = lambda: jnp.zeros((n_slots,), jnp.int32)  # distinct buffers: the jitted step donates the state
    full = lambda value: jnp.full((n_slots,), value, jnp.float32)
    lp = None
    if logprobs:
        top = (n_slots, max_len, n_top)
        lp = SlotLogprobs(chosen=jnp.zeros((n_slots, max_len), jnp.float32), top_ids=jnp.zeros(top, jnp.int32),
                          top_values=jnp.zeros(top, jnp.float32))
    return DecodeState(tokens=jnp.full((n_slots, max_len), pad_id, jnp.int32),
                       cache=init_layer_caches(cfg, n_slots, max_len), pos=zeros(), end=zeros(), prompt_lens=zeros(),
                       done=jnp.ones((n_slots,), bool), rng=jax.vmap(lambda i: jax.random.fold_in(rng, i))(
                           jnp.arange(n_slots)), temperature=full(temperature), top_p=full(top_p),
                       eos_id=jnp.asarray(eos_id, jnp.int32), logprobs=lp)


def free_slots(state: DecodeState) -> Array:
    """[B] bool: the slot holds no unfinished request (never used, generated EOS, or reached its end)."""
    return state.done | (state.pos >= state.end)


def _record_logprobs(lp: SlotLogprobs, rows: Array, column: Array, active: Array, logits: Array, token: Array
                     ) -> SlotLogprobs:
    ids, values = top_logprobs(logits, lp.top_ids.shape[-1])  # [n, n_top]
    keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)
    return SlotLogprobs(
        chosen=lp.chosen.at[rows, column].set(keep(token_logprobs(logits, token), lp.chosen[rows, column])),
        top_ids=lp.top_ids.at[rows, column].set(keep(ids, lp.top_ids[rows, column])),
        top_values=lp.top_values.at[rows, column].set(keep(values, lp.top_values[rows, column])))


def _choose_rows(keys: Array, logits: Array, temperature: Array, top_p: Array, active: Array) -> Array:
    """Per active row what `choose_next` picks for it alone (keys [n], logits [n, V], temperature, top_p and active
    [n]). The nucleus sampling (a sort over V per row) runs only when some active row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = (temperature > 0) & active
    safe_t = jnp.where(sampling, temperature, 1.0)
    draw = lambda key, row, t, p: sample_top_p(key, jax.nn.softmax(row[None] / t, axis=-1), p)[0]
    drawn = jax.lax.cond(jnp.any(sampling), lambda: jax.vmap(draw)(keys, logits, safe_t, top_p), lambda: greedy)
    return jnp.where(sampling, drawn, greedy)


def _place_rows(state: DecodeState, rows: Array, logits: Array, logit_adjust: Optional[Array] = None
                ) -> DecodeState:
    """Choose the next token of the given slots (rows [n] int, logits [n, V]) at their own positions with their own
    temperature, top_p and key, record EOS (and log-probabilities), and advance their pos. Slots that are done or at
    their end are left unchanged. logit_adjust [n, V] (optional) is added to the logits the token is chosen from
    (penalties, biases); the log-probabilities stay the model's."""
    pos = state.pos[rows]
    keys = jax.vmap(jax.random.fold_in)(state.rng[rows], pos)
    active = ~state.done[rows] & (pos < state.end[rows])
    chosen_from = logits if logit_adjust is None else logits + logit_adjust
    token = _choose_rows(keys, chosen_from, state.temperature[rows], state.top_p[rows], active)  # [n]
    column = jnp.minimum(pos, state.tokens.shape[1] - 1)
    current = state.tokens[rows, column]
    lp = state.logprobs
    if lp is not None:
        lp = _record_logprobs(lp, rows, column, active, logits, token)
    return state.replace(tokens=state.tokens.at[rows, column].set(jnp.where(active, token, current)),
                         pos=state.pos.at[rows].set(pos + active), logprobs=lp,
                         done=state.done.at[rows].set(state.done[rows] | (active & (token == state.eos_id))))


def insert(state: DecodeState, prefix: Prefix, slot, *, max_gen_len, pad_id: int = META_PAD_ID, temperature=None,
           top_p=None, rng: Optional[Array] = None) -> DecodeState:
    """Put a prefilled prompt into decode slot `slot` ([] int; its previous request, if any, is dropped) and choose
    its first generated token from the prefix's logits. The slot then generates until EOS or
    min(max_len, prompt length + max_gen_len) tokens in all (Meta's output rule; max_gen_len may be traced).
    temperature, top_p ([] float) and rng (a PRNG key: the request's draws are fold_in(rng, position)) set the slot's
    sampling; None keeps the slot's current value."""
    width, size = prefix.tokens.shape[0], state.tokens.shape[1]
    if width > size:
        raise ValueError(f"prompt width {width} exceeds the slots' cache length {size}")
    slot = jnp.asarray(slot, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    cache = [{name: jax.lax.dynamic_update_slice(buffer, p[name].astype(buffer.dtype), (slot, zero, zero, zero))
              for name, buffer in layer.items()} for layer, p in zip(state.cache, prefix.cache)]
    row = jnp.full((size,), pad_id, jnp.int32).at[:width].set(prefix.tokens)
    set_slot = lambda field, value: field if value is None else field.at[slot].set(jnp.asarray(value, field.dtype))
    state = state.replace(tokens=state.tokens.at[slot].set(row), cache=cache,
                          pos=state.pos.at[slot].set(prefix.length), prompt_lens=state.prompt_lens.at[slot].set(
                              prefix.length), done=state.done.at[slot].set(False),
                          end=state.end.at[slot].set(jnp.minimum(size, prefix.length + max_gen_len)),
                          temperature=set_slot(state.temperature, temperature), top_p=set_slot(state.top_p, top_p),
                          rng=set_slot(state.rng, rng))
    return _place_rows(state, slot[None], prefix.logits[None])


def generate_step(params: dict, cfg: LlamaConfig, state: DecodeState, *, pad_id: int = META_PAD_ID,
                  logit_adjust: Optional[Array] = None) -> DecodeState:
    """One decode step for every slot of an `init_slots` state: feed each slot's last token at its own position,
    write it into the KV cache and choose the next token (free slots compute and discard). logit_adjust [B, V]
    (optional): added to the logits each slot chooses from (see `_place_rows`)."""
    params = layer_params(params, cfg)
    prev = jnp.maximum(state.pos - 1, 0)  # [B]
    fed = jnp.take_along_axis(state.tokens, prev[:, None], axis=1)  # [B, 1]
    hidden, cache = decode_forward(params, cfg, model_inputs(fed, pad_id), state.cache, prev)
    rows = jnp.arange(state.tokens.shape[0])
    return _place_rows(state.replace(cache=cache), rows, project_logits(params, hidden[:, 0]), logit_adjust)


prefill_jit = jax.jit(prefill, static_argnames=("cfg", "pad_id"), compiler_options=DECODE_COMPILER_OPTIONS)
prompt_logprobs_jit = jax.jit(prompt_logprobs, static_argnames=("cfg", "pad_id"))
insert_jit = jax.jit(insert, static_argnames=("pad_id",), donate_argnames=("state",))
generate_step_jit = jax.jit(generate_step, static_argnames=("cfg", "pad_id"), donate_argnames=("state",),
                            compiler_options=DECODE_COMPILER_OPTIONS)
