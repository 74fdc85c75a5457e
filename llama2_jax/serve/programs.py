"""The server's device programs, over the decode slots of llama2_jax.inference.decode (init_slots, generate_step):
put a prompt straight into a slot after a cached prefix, copy a slot for the n samples of one prompt, the decode step
with OpenAI's frequency / presence penalties and logit bias, and the prefix cache's block pool. Every program takes
the served weights as they are stored (int8 ones are widened layer by layer: serve.quantize).

Shape legend: B decode slots, S slot length (max_len), V vocabulary, R prefill width (a bucket), N pool blocks,
T tokens per block, M = S // T blocks per slot, K KV heads, H head dim.

A prompt of L tokens enters a slot by `prefill_slot`: tokens [start, L - 1) go through the model into the slot's
KV cache (slots [0, start) already hold a cached prefix, copied in by `load_blocks`), and the slot is left at pos L,
so that the next `step` feeds the prompt's last token at position L - 1 and draws the first completion token with
fold_in(key, L): what slots.insert would have drawn (tests/serve/test_serve_params.py checks the greedy tokens against
`generate`). Leaving the last prompt token to the step means no program here chooses a token, and the n samples of
a prompt are copies of the prefilled slot (`fork_slot`) that differ only in their key.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax.inference import decode, slots
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import KV_CACHE_AXES, abstract_params, cache_length_axis, layer_cache_shape
from llama2_jax.serve.quantize import is_quantized, weights_view

Array = jax.Array
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (the padded width of `Controls` updates)


# ----------------------------------------------------------------------------------------------------------------------
# A model across devices: the weights sharded by the trainers' rules (model.sharding.LOGICAL_RULES), the slots' KV
# cache as decode.kv_cache_shardings (slots over the data axes, KV heads over tensor), everything else replicated.
# Every program pins its outputs to these shardings, so the state keeps one layout from step to step.


def param_shardings(params: dict, cfg, mesh: Mesh):
    """NamedShardings of the served params (decode.layer_params layout, int8 kernels included: their scales keep
    the kernel's sharding on the axes they keep and are replicated on the contracted ones)."""
    rules = sh.tree_shardings(abstract_params(cfg.replace(scan_layers=False), boxed=True), mesh)

    def match(leaf, rule):
        if not is_quantized(leaf):
            return rule
        spec = tuple(rule.spec) + (None,) * (leaf["int8"].ndim - len(rule.spec))
        kept = [None if size == 1 else axis for axis, size in zip(spec, leaf["scale"].shape)]
        return {"int8": rule, "scale": NamedSharding(mesh, PartitionSpec(*kept))}

    return jax.tree_util.tree_map(match, params, rules, is_leaf=is_quantized)


def state_shardings(state: decode.DecodeState, mesh: Mesh):
    replicated = sh.replicated(mesh)
    shardings = jax.tree_util.tree_map(lambda _: replicated, state)
    return shardings.replace(cache=decode.kv_cache_shardings(mesh, len(state.cache)))


def pool_shardings(pool: decode.LayerCaches, mesh: Mesh):
    """The pool's blocks replicated (any slot may load any block), KV heads over tensor as in the slots."""
    spec = {name: NamedSharding(mesh, sh.logical_to_spec((None,) + KV_CACHE_AXES[name][1:])) for name in ("k", "v")}
    return [dict(spec) for _ in pool]


def _pin(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def _pin_state(state, controls, mesh: Optional[Mesh]):
    if mesh is None:
        return state, controls
    return _pin(state, state_shardings(state, mesh)), _pin(controls, sh.replicated(mesh))


@struct.dataclass
class Controls:
    """Per slot: OpenAI's frequency_penalty, presence_penalty and logit_bias, and the counts they need."""
    counts: Array  # [B, V] int32: how often each token was sampled in the slot's completion so far (OpenAI's c[j])
    frequency: Array  # [B] float32: alpha_frequency
    presence: Array  # [B] float32: alpha_presence
    bias: Array  # [B, V] float32: added to the logits


def init_controls(n_slots: int, vocab_size: int) -> Controls:
    return Controls(counts=jnp.zeros((n_slots, vocab_size), jnp.int32), frequency=jnp.zeros((n_slots,), jnp.float32),
                    presence=jnp.zeros((n_slots,), jnp.float32),
                    bias=jnp.zeros((n_slots, vocab_size), jnp.float32))


def logit_adjust(controls: Controls) -> Array:
    """[B, V] what OpenAI adds to the logits mu before sampling (platform.openai.com/docs/advanced-usage, "Frequency
    and presence penalties"): mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, plus logit_bias[j]
    ("the bias is added to the logits generated by the model prior to sampling")."""
    counts = controls.counts.astype(jnp.float32)
    return (controls.bias - counts * controls.frequency[:, None]
            - (counts > 0).astype(jnp.float32) * controls.presence[:, None])


def step(params: dict, cfg, state: decode.DecodeState, controls: Controls, mesh: Optional[Mesh] = None
         ) -> tuple[decode.DecodeState, Controls]:
    """slots.generate_step with each slot choosing from its adjusted logits (`logit_adjust`; log-probabilities stay
    the model's), then the chosen tokens counted."""
    before = state.pos
    state = slots.generate_step(weights_view(params, cfg), cfg, state, logit_adjust=logit_adjust(controls))
    rows = jnp.arange(state.pos.shape[0])
    token = state.tokens[rows, jnp.minimum(before, state.tokens.shape[1] - 1)]
    placed = (state.pos > before).astype(jnp.int32)
    return _pin_state(state, controls.replace(counts=controls.counts.at[rows, token].add(placed)), mesh)


def prompt_logprobs(params: dict, cfg, prompt_tokens: Array) -> slots.SlotLogprobs:
    """slots.prompt_logprobs over the served weights (int8 ones included)."""
    return slots.prompt_logprobs(weights_view(params, cfg), cfg, prompt_tokens)


def latest(state: decode.DecodeState) -> dict[str, Array]:
    """What the host reads after a step, per slot: the last placed token (at pos - 1), pos, done, and (when the
    state records them) that token's log-probability and the most likely tokens there."""
    rows = jnp.arange(state.pos.shape[0])
    column = jnp.maximum(state.pos - 1, 0)
    out = {"token": state.tokens[rows, column], "pos": state.pos, "done": state.done}
    if state.logprobs is not None:
        out.update(chosen=state.logprobs.chosen[rows, column], top_ids=state.logprobs.top_ids[rows, column],
                   top_values=state.logprobs.top_values[rows, column])
    return out


def _slot_rows(cache: decode.LayerCaches, slot) -> decode.LayerCaches:
    return [{name: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=0) for name, c in layer.items()} for layer in cache]


def _put_rows(cache: decode.LayerCaches, rows: decode.LayerCaches, slot) -> decode.LayerCaches:
    return [{name: jax.lax.dynamic_update_slice_in_dim(c, rows_layer[name], slot, axis=0) for name, c in layer.items()}
            for layer, rows_layer in zip(cache, rows)]


def prefill_slot(params: dict, cfg, state: decode.DecodeState, controls: Controls, slot, prompt_row: Array, length,
                 start, rest: Array, *, max_tokens, temperature, top_p, rng: Array, frequency, presence,
                 bias_ids: Array, bias_values: Array, pad_id: int = decode.META_PAD_ID, mesh: Optional[Mesh] = None
                 ) -> tuple[decode.DecodeState, Controls]:
    """Put a prompt into decode slot `slot` (its previous request, if any, is dropped); see the module docstring.

    Args:
      prompt_row: [S] int32, the prompt padded with pad_id; length: [] its length L >= 1.
      start: [] the first position to compute (slots < start hold the prompt's KV already), start + R <= S.
      rest: [R] int32 = prompt_row[start : start + R] (R a bucket >= L - 1 - start; positions >= L - 1 are padding
        whose cache writes are overwritten before anything attends to them).
      max_tokens, temperature, top_p, frequency, presence: [] scalars; rng: the request's PRNG key.
      bias_ids, bias_values: [MAX_LOGIT_BIAS] logit_bias entries (unused ones: id >= V, dropped).
    """
    params = decode.layer_params(weights_view(params, cfg), cfg)
    rows = _slot_rows(state.cache, slot)
    _, rows = decode.decode_forward(params, cfg, decode.model_inputs(rest[None], pad_id), rows, start)
    size = state.tokens.shape[1]
    put = lambda field, value: field.at[slot].set(jnp.asarray(value, field.dtype))
    state = state.replace(cache=_put_rows(state.cache, rows, slot), tokens=put(state.tokens, prompt_row),
                          pos=put(state.pos, length), prompt_lens=put(state.prompt_lens, length),
                          end=put(state.end, jnp.minimum(size, length + max_tokens)), done=put(state.done, False),
                          temperature=put(state.temperature, temperature), top_p=put(state.top_p, top_p),
                          rng=put(state.rng, rng))
    bias = jnp.zeros(controls.bias.shape[1:], jnp.float32).at[bias_ids].set(bias_values, mode="drop")
    controls = Controls(counts=put(controls.counts, 0), frequency=put(controls.frequency, frequency),
                        presence=put(controls.presence, presence), bias=put(controls.bias, bias))
    return _pin_state(state, controls, mesh)


def fork_slot(state: decode.DecodeState, controls: Controls, source, target, rng: Array, mesh: Optional[Mesh] = None
              ) -> tuple[decode.DecodeState, Controls]:
    """Slot `target` becomes a copy of slot `source` (its KV cache, tokens, position, sampling and controls) drawing
    with key `rng`: another sample of the same prompt, without prefilling it again."""
    copy = lambda x: x.at[target].set(x[source])
    cache = [{name: copy(c) for name, c in layer.items()} for layer in state.cache]
    state = state.replace(cache=cache, tokens=copy(state.tokens), pos=copy(state.pos), end=copy(state.end),
                          prompt_lens=copy(state.prompt_lens), done=copy(state.done),
                          temperature=copy(state.temperature), top_p=copy(state.top_p),
                          rng=state.rng.at[target].set(rng))
    return _pin_state(state, jax.tree_util.tree_map(copy, controls), mesh)


# ----------------------------------------------------------------------------------------------------------------------
# The prefix cache's block pool: per layer {"k": [N, K, H, T], "v": [N, K, T, H]} (the KV cache layout with blocks in
# place of slots), filled from and copied into slot caches block by block.


def init_pool(cfg, n_blocks: int, block: int) -> decode.LayerCaches:
    return [{name: jnp.zeros(layer_cache_shape(cfg, name, n_blocks, block), cfg.dtype) for name in ("k", "v")}
            for _ in range(cfg.n_layers)]


def _block_start(name: str, index, block: int, slot_or_block) -> tuple:
    starts = [slot_or_block, 0, 0, 0]
    starts[cache_length_axis(name)] = index * block
    return tuple(jnp.asarray(s, jnp.int32) for s in starts)


def load_blocks(state: decode.DecodeState, pool: decode.LayerCaches, slot, ids: Array, count,
                mesh: Optional[Mesh] = None) -> decode.DecodeState:
    """Copy pool blocks ids[0 .. count) into slot `slot`'s KV cache at positions [0, count * T). ids: [M] int32."""
    block = pool[0]["v"].shape[cache_length_axis("v")]

    def body(j, cache):
        return [{name: jax.lax.dynamic_update_slice(c, jax.lax.dynamic_index_in_dim(p[name], ids[j], 0),
                                                    _block_start(name, j, block, slot))
                 for name, c in layer.items()} for layer, p in zip(cache, pool)]

    state = state.replace(cache=jax.lax.fori_loop(0, count, body, state.cache))
    return state if mesh is None else _pin(state, state_shardings(state, mesh))


def save_blocks(pool: decode.LayerCaches, state: decode.DecodeState, slot, ids: Array, first, count,
                mesh: Optional[Mesh] = None) -> decode.LayerCaches:
    """Copy slot `slot`'s KV cache blocks first .. count - 1 (positions [j * T, (j + 1) * T)) into pool blocks
    ids[j]. ids: [M] int32."""
    block = pool[0]["v"].shape[cache_length_axis("v")]

    def body(j, pool):
        out = []
        for layer, p in zip(state.cache, pool):
            sizes = {name: tuple(1 if a == 0 else (block if a == cache_length_axis(name) else d)
                                 for a, d in enumerate(c.shape)) for name, c in layer.items()}
            out.append({name: jax.lax.dynamic_update_slice(
                p[name], jax.lax.dynamic_slice(layer[name], _block_start(name, j, block, slot), sizes[name]),
                (ids[j], 0, 0, 0)) for name in layer})
        return out

    pool = jax.lax.fori_loop(first, count, body, pool)
    return pool if mesh is None else _pin(pool, pool_shardings(pool, mesh))


step_jit = jax.jit(step, static_argnames=("cfg", "mesh"), donate_argnames=("state", "controls"),
                   compiler_options=decode.DECODE_COMPILER_OPTIONS)
latest_jit = jax.jit(latest)
prompt_logprobs_jit = jax.jit(prompt_logprobs, static_argnames=("cfg",))
prefill_slot_jit = jax.jit(prefill_slot, static_argnames=("cfg", "pad_id", "mesh"),
                           donate_argnames=("state", "controls"), compiler_options=decode.DECODE_COMPILER_OPTIONS)
fork_slot_jit = jax.jit(fork_slot, static_argnames=("mesh",), donate_argnames=("state", "controls"))
load_blocks_jit = jax.jit(load_blocks, static_argnames=("mesh",), donate_argnames=("state",))
save_blocks_jit = jax.jit(save_blocks, static_argnames=("mesh",), donate_argnames=("pool",))
