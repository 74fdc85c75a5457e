"""Sampling from Llama 2 with a compiled decode loop and a preallocated KV cache, as Meta's `llama/generation.py`.

Shape legend: B batch, P padded prompt width, S token buffer / KV cache length, V vocabulary.

Meta's scheme (spec I), reproduced exactly:
  * prompts of different lengths are right-padded with `pad_id` in a buffer of
    total_len = min(max_seq_len, max_gen_len + longest prompt);
  * one prefill pass covers [0, shortest prompt); then one token per step; where a row still has a prompt token at a
    position it is kept and the sample discarded;
  * next token: argmax at temperature 0, else softmax(logits / T) then `sample_top_p`;
  * a row is done once it generates EOS outside its prompt; the loop exits when every row is done;
  * output: the prompt is dropped (unless `echo`), the row is cut to max_gen_len, then truncated before the first EOS.
  * log-probabilities (optional) are log softmax(logits[j - 1])[token j] of the untempered logits, 0 at position 0
    and at unfilled slots.

Here the buffer has a *static* size S = min(max_seq_len, P + max_gen_len) (P is the padded prompt width, bucketed by
the host-side `generate` so that prompts reuse compilations) while the loop stops at Meta's *dynamic* total_len, so
the results do not depend on the padding. The prefill runs over all P columns at once (rows shorter than P write
padding into cache slots that are overwritten, before anything attends to them, by the step that fills that slot).
Each step draws from `fold_in(rng, position)`, so decoding in chunks (streaming) gives the same tokens as one call.

Speed: the decode loop runs the model's own blocks (model.Block) with one KV buffer per layer, updated in place
(`decode_forward`; the model's stacked [L, ...] cache would be sliced and re-stacked every step) in a layout that
attention reads without a transpose (model.KV_CACHE_AXES, attention.cached_attention); jit it with
`DECODE_COMPILER_OPTIONS` so that XLA:CPU also sees that the update can be in place. The loop is split into a few
loops over growing cache prefixes (`cache_segments`) so that a step attends to O(position) slots rather than all S
(with Meta's default max_gen_len, S is max_seq_len).

The pure core (`init_decode`, `decode_steps`, `sample`) works inside `jax.jit` on a sharded mesh; `generate`,
`text_completion` and `chat_completion` are host-side conveniences. CLI:
  python -m llama2_jax.generate --checkpoint=DIR --tokenizer=PATH --prompt="Once upon a time"
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llama2_jax import sharding as sh
from llama2_jax.config import LlamaConfig
from llama2_jax.model import (KV_CACHE_AXES, Block, RMSNorm, cache_length_axis, default_positions, layer_cache_shape,
                              project, unstack_layers)

Array = jax.Array
DecodeState = dict  # see `init_decode`
LayerCaches = list  # one {"k": [B, K, H, S], "v": [B, K, S, H]} per layer (model.KV_CACHE_AXES)

DEFAULT_TEMPERATURE = 0.6  # Meta's text_completion / chat_completion defaults (spec I)
DEFAULT_TOP_P = 0.9
META_PAD_ID = -1  # Llama 2's tokenizer has no pad piece
EOS_ID = 2
LENGTH_BUCKET = 64  # the host pads prompt widths to a multiple of this, so that prompts share compilations
CACHE_SEGMENTS = 4  # decode loops over growing cache prefixes (see `cache_segments`)
SEGMENT_ROUND = 128


# ----------------------------------------------------------------------------------------------------------------------
# Shardings and token choice


def kv_cache_shardings(mesh: Mesh, n_layers: int) -> LayerCaches:
    """NamedShardings of the decode KV cache (`init_layer_caches`), batch over the data axes and KV heads over
    tensor (from sharding.LOGICAL_RULES). B must divide by the data-parallel size and K by the tensor size."""
    spec = {name: NamedSharding(mesh, sh.logical_to_spec(axes)) for name, axes in KV_CACHE_AXES.items()}
    return [dict(spec) for _ in range(n_layers)]


def init_layer_caches(cfg: LlamaConfig, batch: int, max_len: int) -> LayerCaches:
    """Zeroed KV cache, one {"k": [B, K, H, S], "v": [B, K, S, H]} (model.KV_CACHE_AXES) per layer in the compute
    dtype.

    Separate per-layer buffers (rather than model.init_cache's stacked [L, ...] arrays) let XLA update each layer in
    place inside the decode loop: a stacked cache is sliced per layer and re-stacked, copying it every step."""
    return [{name: jnp.zeros(layer_cache_shape(cfg, name, batch, max_len), cfg.dtype) for name in KV_CACHE_AXES}
            for _ in range(cfg.n_layers)]


def sample_top_p(rng: Array, probs: Array, top_p) -> Array:
    """Meta's `sample_top_p`. probs [B, V] -> token ids [B] int32.

    Sort descending, zero every token whose cumulative mass *before* it exceeds p (`cumsum - prob > p`, so the top
    token is always kept), renormalise, draw one token."""
    order = jnp.argsort(-probs, axis=-1)  # [B, V], descending (stable: ties keep the lower id first)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    cumulative = jnp.cumsum(sorted_probs, axis=-1)
    sorted_probs = jnp.where(cumulative - sorted_probs > top_p, 0.0, sorted_probs)
    sorted_probs = sorted_probs / jnp.sum(sorted_probs, axis=-1, keepdims=True)
    choice = jax.random.categorical(rng, jnp.log(sorted_probs), axis=-1)  # [B]
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def choose_next(rng: Array, logits: Array, temperature, top_p) -> Array:
    """logits [B, V] float32 -> next token ids [B]: argmax when temperature == 0, else top-p on softmax(logits / T)."""

    def sampled():
        return sample_top_p(rng, jax.nn.softmax(logits / temperature, axis=-1), top_p)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, sampled, greedy)


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target]: logits [..., V] float32, targets [...] int -> [...] float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------------
# The pure core


def _model_inputs(tokens: Array, pad_id: int) -> Array:
    """Padding -> id 0 (pad_id is -1 for Llama 2, which is no row of the embedding); its outputs are never used."""
    return jnp.where(tokens == pad_id, 0, tokens)


def _project(params: dict, hidden: Array) -> Array:
    """Final-norm hidden [..., D] -> float32 logits [..., V] (the model's output layer)."""
    return project(hidden, params["output"].astype(hidden.dtype), preferred_element_type=jnp.float32)


def layer_params(params: dict, cfg: LlamaConfig) -> dict:
    """Unboxed params with one `layers_{i}` entry per block (scanned params are unstacked: a copy of the blocks)."""
    params = nn.unbox(params)
    return unstack_layers(params, cfg.n_layers) if "layers" in params else params


def decode_forward(params: dict, cfg: LlamaConfig, tokens: Array, caches: LayerCaches, cache_index: Array
                   ) -> tuple[Array, LayerCaches]:
    """The model's forward pass with a per-layer KV cache, built from its own modules (model.Block, RMSNorm).

    Args:
      params: `layer_params` output; tokens [B, T] int (valid ids); caches: `init_layer_caches`;
      cache_index: scalar int, the slot of tokens[:, 0] (= its position).
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


def _write_column(buffer: Array, column: Array, pos: Array) -> Array:
    """buffer [B, S] with column [B] written at slot pos."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None].astype(buffer.dtype), pos, axis=1)


def _place(state: DecodeState, logits: Array) -> DecodeState:
    """Choose the token at slot state["pos"] from logits [B, V] of the previous slot, keep prompt tokens, record
    the log-probability and EOS, and advance pos. A no-op on the buffers when pos >= end."""
    pos = state["pos"]
    sampled = choose_next(jax.random.fold_in(state["rng"], pos), logits, state["temperature"], state["top_p"])
    current = jax.lax.dynamic_index_in_dim(state["tokens"], pos, axis=1, keepdims=False)  # [B]
    in_prompt = pos < state["prompt_lens"]
    token = jnp.where(in_prompt, current, sampled)
    active = pos < state["end"]
    new = dict(state, pos=pos + 1)
    new["tokens"] = _write_column(state["tokens"], jnp.where(active, token, current), pos)
    new["done"] = state["done"] | (active & ~in_prompt & (token == state["eos_id"]))
    if "logprobs" in state:
        lp = jnp.where(active, token_logprobs(logits, token), 0.0)
        new["logprobs"] = _write_column(state["logprobs"], lp, pos)
    return new


def init_decode(params: dict, cfg: LlamaConfig, prompt_tokens: Array, prompt_lens: Array, rng: Array, *,
                max_gen_len: int, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P, eos_id: int = EOS_ID,
                pad_id: int = META_PAD_ID, logprobs: bool = False, mesh: Optional[Mesh] = None) -> DecodeState:
    """Allocate the buffers, prefill [0, P) and choose the token at the shortest prompt's end.

    Args:
      prompt_tokens: [B, P] int, right-padded with pad_id (P <= cfg.max_seq_len); prompt_lens: [B] int, each >= 1.
      rng: a PRNG key; max_gen_len: static; temperature, top_p, eos_id: scalars (may be traced).
      mesh: when given, the KV cache is sharded with `kv_cache_shardings` and the token buffer over the batch.
    Returns the decode state: tokens [B, S] (pad_id where unfilled), cache (`init_layer_caches`), pos (next
      slot to fill), end (Meta's total_len), prompt_lens [B], done [B] bool, rng, temperature, top_p, eos_id, and
      logprobs [B, S] float32 when asked for.
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
    hidden, cache = decode_forward(params, cfg, _model_inputs(tokens[:, :width], pad_id), cache,
                                   jnp.zeros((), jnp.int32))
    min_len = jnp.min(prompt_lens)
    state = dict(tokens=tokens, cache=cache, pos=min_len, prompt_lens=prompt_lens,
                 end=jnp.minimum(cfg.max_seq_len, max_gen_len + jnp.max(prompt_lens)),
                 done=jnp.zeros((batch,), bool), rng=rng, temperature=jnp.asarray(temperature, jnp.float32),
                 top_p=jnp.asarray(top_p, jnp.float32), eos_id=jnp.asarray(eos_id, jnp.int32))
    if logprobs:  # positions 1 .. min_len - 1 from the prefill (min_len itself is set by `_place`)
        lp = token_logprobs(_project(params, hidden[:, :-1]), tokens[:, 1:width])
        lp = jnp.where(jnp.arange(1, width) < min_len, lp, 0.0)
        state["logprobs"] = jnp.zeros((batch, size), jnp.float32).at[:, 1:width].set(lp)
    last = jax.lax.dynamic_index_in_dim(hidden, min_len - 1, axis=1, keepdims=False)  # [B, D]
    return _place(state, _project(params, last))


def cache_segments(size: int) -> list[int]:
    """Static cache lengths of successive decode loops: about size/8, size/4, size/2, size (multiples of 128, at
    least 128). A step at slot t runs in the first loop whose length exceeds t and attends to that many slots only,
    so attention costs O(t) rather than O(size) (Meta's default max_gen_len makes size = max_seq_len)."""
    ends = sorted({min(size, -(-size // (2 ** k * SEGMENT_ROUND)) * SEGMENT_ROUND) for k in range(CACHE_SEGMENTS)})
    return ends


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
    stop = state["end"] if max_steps is None else jnp.minimum(state["end"], state["pos"] + max_steps)

    def run_segment(state: DecodeState, length: int) -> DecodeState:
        def cond(s):
            return (s["pos"] < jnp.minimum(stop, length)) & ~jnp.all(s["done"])

        def body(s):
            prev = s["pos"] - 1
            fed = jax.lax.dynamic_slice_in_dim(s["tokens"], prev, 1, axis=1)  # [B, 1]
            hidden, cache = decode_forward(params, cfg, _model_inputs(fed, pad_id), s["cache"], prev)
            if mesh is not None:
                cache = jax.lax.with_sharding_constraint(cache, kv_cache_shardings(mesh, cfg.n_layers))
            return _place(dict(s, cache=cache), _project(params, hidden[:, 0]))

        return jax.lax.while_loop(cond, body, state)

    size = state["tokens"].shape[1]
    for length in cache_segments(size):
        if length == size:
            state = run_segment(state, length)
        else:
            prefix = run_segment(dict(state, cache=_slice_caches(state["cache"], length)), length)
            state = dict(prefix, cache=_restore_caches(state["cache"], prefix["cache"]))
    return state


def generated_lengths(state: DecodeState, max_gen_len: int) -> Array:
    """[B] number of generated tokens each row keeps after Meta's post-processing (cut to max_gen_len and before
    the first generated EOS): the response length, EOS excluded."""
    tokens, prompt_lens = state["tokens"], state["prompt_lens"][:, None]
    slots = jnp.arange(tokens.shape[1])[None, :]
    limit = jnp.minimum(prompt_lens + max_gen_len, state["pos"])  # [B, 1]
    is_eos = (tokens == state["eos_id"]) & (slots >= prompt_lens) & (slots < limit)
    first_stop = jnp.min(jnp.where(is_eos, slots, limit), axis=1)
    return (first_stop - prompt_lens[:, 0]).astype(jnp.int32)


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
      done [B] bool: the row generated EOS; logprobs [B, S] float32 when asked for.
    """
    state = init_decode(params, cfg, prompt_tokens, prompt_lens, rng, max_gen_len=max_gen_len,
                        temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id, logprobs=logprobs,
                        mesh=mesh)
    state = decode_steps(params, cfg, state, pad_id=pad_id, mesh=mesh)
    out = {key: state[key] for key in ("tokens", "prompt_lens", "done")}
    out["lengths"] = generated_lengths(state, max_gen_len)
    if logprobs:
        out["logprobs"] = state["logprobs"]
    return out


# XLA:CPU's default copy insertion cannot prove that a cache buffer read by attention and then overwritten in the
# same loop step may be updated in place, so it copies every layer's cache twice per step (measured at the 15M shape,
# batch 1: ~0.3 ms of a 2.8 ms step). Region analysis proves it. The option is CPU-only; other backends ignore it.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
_STATIC = ("cfg", "max_gen_len", "pad_id", "logprobs", "mesh")
sample_jit = jax.jit(sample, static_argnames=_STATIC,  # compiled once per (static args, B, P)
                     compiler_options=DECODE_COMPILER_OPTIONS)
init_decode_jit = jax.jit(init_decode, static_argnames=_STATIC, compiler_options=DECODE_COMPILER_OPTIONS)
decode_steps_jit = jax.jit(decode_steps, static_argnames=("cfg", "pad_id", "max_steps", "mesh"),
                           donate_argnames=("state",), compiler_options=DECODE_COMPILER_OPTIONS)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, max_seq_len: int, bucket: int = LENGTH_BUCKET,
                batch_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to [B', P] (P = longest rounded up to `bucket`, capped at max_seq_len; B' = B rounded
    up to `batch_multiple` by repeating the first prompt). Returns (tokens [B', P] int32, lengths [B'] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest > max_seq_len:
        raise ValueError(f"a prompt has {longest} tokens, more than max_seq_len {max_seq_len}")
    prompts = list(prompts) + [prompts[0]] * (-len(prompts) % batch_multiple)
    width = min(max_seq_len, -(-longest // bucket) * bucket)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def prng_key(rng) -> Array:
    """A PRNG key from an int seed (or the key itself)."""
    return jax.random.PRNGKey(rng) if isinstance(rng, int) else rng


def postprocess(tokens: np.ndarray, prompt_lens: Sequence[int], max_gen_len: int, eos_id: int, echo: bool,
                logprobs: Optional[np.ndarray] = None) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Meta's output rule per row: drop the prompt unless echo, cut to max_gen_len, truncate before the first EOS."""
    out_tokens, out_logprobs = [], []
    for i, length in enumerate(prompt_lens):
        start = 0 if echo else int(length)
        row = tokens[i, start: int(length) + max_gen_len].tolist()
        probs = None if logprobs is None else logprobs[i, start: int(length) + max_gen_len].tolist()
        if eos_id in row:
            cut = row.index(eos_id)
            row, probs = row[:cut], (None if probs is None else probs[:cut])
        out_tokens.append(row)
        out_logprobs.append(probs)
    return out_tokens, (None if logprobs is None else out_logprobs)


def sample_lists(params: dict, cfg: LlamaConfig, prompt_tokens: Sequence[Sequence[int]], *, max_gen_len: int,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, logprobs: bool = False,
                 eos_id: int = EOS_ID, pad_id: int = META_PAD_ID, rng=1, mesh: Optional[Mesh] = None,
                 bucket: int = LENGTH_BUCKET) -> dict[str, np.ndarray]:
    """`sample` on token lists: pads (widths bucketed, batch rounded up to the mesh's data-parallel size), runs the
    compiled sampler (one compilation per padded shape and static options) and returns its outputs as numpy arrays
    for the given prompts only. rng: a PRNG key or an int seed."""
    multiple = 1 if mesh is None else sh.data_parallel_size(mesh)
    tokens, lens = pad_prompts(prompt_tokens, pad_id, cfg.max_seq_len, bucket, multiple)
    out = sample_jit(params, cfg, jnp.asarray(tokens), jnp.asarray(lens), prng_key(rng), max_gen_len=max_gen_len,
                     temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id, logprobs=logprobs,
                     mesh=mesh)
    return {name: value[: len(prompt_tokens)] for name, value in jax.device_get(out).items()}


def generate_with_logprobs(params: dict, cfg: LlamaConfig, prompt_tokens: Sequence[Sequence[int]], *,
                           max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                           eos_id: int = EOS_ID, **kwargs) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Meta's `Llama.generate`: (token lists, log-prob lists or None). Other options: see `sample_lists`."""
    max_gen_len = cfg.max_seq_len - 1 if max_gen_len is None else max_gen_len
    out = sample_lists(params, cfg, prompt_tokens, max_gen_len=max_gen_len, logprobs=logprobs, eos_id=eos_id,
                       **kwargs)
    return postprocess(out["tokens"], out["prompt_lens"], max_gen_len, eos_id, echo, out.get("logprobs"))


def generate(params: dict, cfg: LlamaConfig, prompt_tokens: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Generated token lists, one per prompt (see `generate_with_logprobs` for the options)."""
    kwargs.pop("logprobs", None)
    return generate_with_logprobs(params, cfg, prompt_tokens, **kwargs)[0]


def _results(tokenizer, generations, logprobs, contents) -> list[dict[str, Any]]:
    results = []
    for i, (tokens, content) in enumerate(zip(generations, contents)):
        result: dict[str, Any] = {"generation": content}
        if logprobs is not None:
            result["tokens"] = [tokenizer.decode([t]) for t in tokens]
            result["logprobs"] = logprobs[i]
        results.append(result)
    return results


def text_completion(params: dict, cfg: LlamaConfig, tokenizer, prompts: Sequence[str], *,
                    temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                    max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, rng=1,
                    mesh: Optional[Mesh] = None) -> list[dict[str, Any]]:
    """Meta's `text_completion`: [{"generation": str}] (+ "tokens", "logprobs" when logprobs)."""
    prompt_tokens = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    generations, lps = generate_with_logprobs(
        params, cfg, prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
        logprobs=logprobs, echo=echo, eos_id=tokenizer.eos_id, rng=rng, mesh=mesh)
    return _results(tokenizer, generations, lps, [tokenizer.decode(t) for t in generations])


def chat_completion(params: dict, cfg: LlamaConfig, tokenizer, dialogs: Sequence, *,
                    temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                    max_gen_len: Optional[int] = None, logprobs: bool = False, rng=1,
                    mesh: Optional[Mesh] = None) -> list[dict[str, Any]]:
    """Meta's `chat_completion`: [{"generation": {"role": "assistant", "content": str}}] (+ "tokens", "logprobs").
    Dialogs containing special tags still generate, but their content is `chat.UNSAFE_ERROR`."""
    from llama2_jax import chat

    prompt_tokens = [chat.encode_dialog(tokenizer, dialog) for dialog in dialogs]
    unsafe = [chat.dialog_has_special_tags(dialog) for dialog in dialogs]
    generations, lps = generate_with_logprobs(
        params, cfg, prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
        logprobs=logprobs, eos_id=tokenizer.eos_id, rng=rng, mesh=mesh)
    contents = [{"role": "assistant", "content": chat.UNSAFE_ERROR if bad else tokenizer.decode(t)}
                for t, bad in zip(generations, unsafe)]
    return _results(tokenizer, generations, lps, contents)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --tokenizer, --max_gen_len, --temperature, --top_p, --seed (shared with chat_repl)."""
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint dir or trainer workdir")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--max_gen_len", type=int, default=None, help="default: max_seq_len - 1")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--seed", type=int, default=1, help="Meta fixes the seed at 1")


def load_model(checkpoint: str, tokenizer_path: str):
    """(params, LlamaConfig, Tokenizer) from a checkpoint dir and a tokenizer file."""
    from llama2_jax.checkpoint import load_params
    from llama2_jax.tokenizer import Tokenizer

    params, cfg = load_params(checkpoint)
    return jax.device_put(params), cfg, Tokenizer(tokenizer_path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama2_jax.generate", description=__doc__.split("\n")[0])
    add_sampling_flags(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--echo", action="store_true", help="print the prompt too (decoded with the completion)")
    args = parser.parse_args(argv)
    params, cfg, tokenizer = load_model(args.checkpoint, args.tokenizer)
    results = text_completion(params, cfg, tokenizer, args.prompt, temperature=args.temperature, top_p=args.top_p,
                              max_gen_len=args.max_gen_len, echo=args.echo, rng=args.seed)
    for result in results:
        # the completion alone, as Meta's text_completion returns it; --echo decodes prompt and completion together
        # (pasting the prompt string in front would lose the space SentencePiece folds into the first new token)
        print(result["generation"])
        if len(results) > 1:
            print("\n==================================\n")


if __name__ == "__main__":
    main()
