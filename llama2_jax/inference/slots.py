"""Decode slots: prefill / insert / generate_step, a fixed batch of independent requests (the server's continuous
batching; `llama2_jax.serve`).

A server keeps one `init_slots` state of n slots; for each new request it runs `prefill` on the prompt alone, then,
between two `generate_step`s, `insert`s the prefix into a free slot (`free_slots`). Every slot has its own position
(pos, end [B]), temperature, top_p and PRNG key; a step feeds each slot's last token at its own position
(decode_forward with [B] cache indices) and attends over the whole cache (no cache segments). A slot's token at
position t is drawn from fold_in(slot key, t): a request inserted with rng=PRNGKey(seed) draws what `sample` draws
for its prompt alone with that seed, whatever shares the batch (tests/inference/test_slots.py). With
init_slots(logprobs=True) each slot also records the untempered log-probability of every chosen token and the
TOP_LOGPROBS most likely tokens at that position (OpenAI's `logprobs`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from llama2_jax.inference.decode import (
    DECODE_COMPILER_OPTIONS,
    EOS_ID,
    META_PAD_ID,
    Array,
    DecodeState,
    LayerCaches,
    decode_forward,
    init_layer_caches,
    kv_cache_shardings,
    layer_params,
    model_inputs,
    project_logits,
)
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, sample_top_p
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.training.losses import token_logprobs

TOP_LOGPROBS = 5  # the most likely tokens recorded per position (OpenAI's completions allow logprobs <= 5)


MIN_PREFILL_WIDTH = 16


def prefill_widths(max_width: int, smallest: int = MIN_PREFILL_WIDTH) -> list[int]:
    """Prefill widths: powers of two from `smallest`, then max_width itself (a bounded number of prefill programs)."""
    widths, width = [], smallest
    while width < max_width:
        widths.append(width)
        width *= 2
    return widths + [max_width]


def prefill_width(length: int, widths: Sequence[int]) -> int:
    """The first of `widths` that holds a prompt of `length` tokens."""
    return next(width for width in widths if width >= length)


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


def slot_state_shardings(state: DecodeState, mesh: Mesh):
    """Shardings of an `init_slots` state on a mesh: the KV cache as `decode.kv_cache_shardings` (slots over the data
    axes, KV heads over tensor), everything else replicated."""
    replicated = sh.replicated(mesh)
    return jax.tree_util.tree_map(lambda _: replicated, state).replace(
        cache=kv_cache_shardings(mesh, len(state.cache)))


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
