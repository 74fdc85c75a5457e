"""Sampling a list of prompts through decode slots (continuous batching, `slots`), for rollouts: N slots decode
together, and the slot of a finished answer takes the next waiting prompt at once, so short answers never wait for the
longest one of a fixed batch (`decode.sample` runs every row until the batch's longest answer ends).

Every answer draws with its own PRNG key (`sample_keys`: fold_in(fold_in(rng, prompt index), sample index)), and a
slot draws its token at position t from fold_in(key, t), as `decode.sample` does for one prompt alone with that key:
an answer's tokens do not depend on the slot count, on the order of the prompts or on what shares the batch
(tests/inference/test_slot_sampler.py). The outputs are those of `decode.sample` (prompt + answer rows, lengths, done,
truncated), in prompt order.

The host loop calls three compiled programs: `slots.prefill_jit` once per distinct prompt (widths padded to
`slots.prefill_widths`, a few powers of two, so a bounded number of programs is compiled; the samples of one prompt share
its prefix), `slots.insert_jit` per answer, and `steps_until_free_jit`,
which decodes in one `lax.while_loop` until some slot that was busy becomes free (one host round trip per finished
answer, not per token).

Shape legend: N prompts, B slots, P output prompt width, S = min(max_seq_len, P + max_gen_len) the token buffer and
slot cache length, V vocabulary.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama2_jax.inference import slots
from llama2_jax.inference.decode import (
    DECODE_COMPILER_OPTIONS,
    EOS_ID,
    META_PAD_ID,
    Array,
    DecodeState,
    layer_params,
    truncated_rows,
)
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_max_gen_len, check_sampling
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig

def sample_keys(rng: Array, prompt_ids, sample_ids) -> Array:
    """[N] PRNG keys, one per answer: fold_in(fold_in(rng, prompt id), sample id) (prompt_ids, sample_ids [N] int).
    The same (prompt, sample) gets the same key whatever the batch it is drawn in."""
    prompt_ids, sample_ids = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(sample_ids, jnp.int32)
    return jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(rng, p), s))(prompt_ids, sample_ids)


def _pin(state: DecodeState, mesh: Optional[Mesh]) -> DecodeState:
    """Keep the state in one layout on a mesh (`slots.slot_state_shardings`) from program to program."""
    return state if mesh is None else jax.lax.with_sharding_constraint(state, slots.slot_state_shardings(state, mesh))


def steps_until_free(params: dict, cfg: LlamaConfig, state: DecodeState, max_steps, *, pad_id: int = META_PAD_ID,
                     mesh: Optional[Mesh] = None) -> DecodeState:
    """`slots.generate_step` in a `lax.while_loop` until a slot that was busy on entry is free (EOS or its end),
    every slot is free, or after max_steps ([] int) steps."""
    params = layer_params(params, cfg)  # once, outside the loop (scanned params are unstacked: a copy)
    busy_on_entry = ~slots.free_slots(state)

    def cond(carry):
        s, n = carry
        free = slots.free_slots(s)
        return (n < max_steps) & jnp.any(~free) & ~jnp.any(free & busy_on_entry)

    def body(carry):
        s, n = carry
        return _pin(slots.generate_step(params, cfg, s, pad_id=pad_id), mesh), n + 1

    return jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))[0]


def insert(state: DecodeState, prefix: slots.Prefix, slot, max_gen_len, rng: Array, *, pad_id: int = META_PAD_ID,
           mesh: Optional[Mesh] = None) -> DecodeState:
    """`slots.insert` of one answer's prefix, its max_gen_len and its key, the state kept in its layout."""
    return _pin(slots.insert(state, prefix, slot, max_gen_len=max_gen_len, pad_id=pad_id, rng=rng), mesh)


steps_until_free_jit = jax.jit(steps_until_free, static_argnames=("cfg", "pad_id", "mesh"),
                               donate_argnames=("state",), compiler_options=DECODE_COMPILER_OPTIONS)
insert_jit = jax.jit(insert, static_argnames=("pad_id", "mesh"), donate_argnames=("state",))


def _padded(prompt: Sequence[int], width: int, pad_id: int) -> np.ndarray:
    row = np.full((width,), pad_id, np.int32)
    row[: len(prompt)] = prompt
    return row


def _per_prompt(value, n: int, name: str) -> list[int]:
    values = [value] * n if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    for v in values:
        check_max_gen_len(int(v) if isinstance(v, np.integer) else v, name)
    return [int(v) for v in values]


def _answer_lengths(tokens: np.ndarray, prompt_lens: np.ndarray, max_gen_lens: np.ndarray, pos: np.ndarray,
                    eos_id: int) -> np.ndarray:
    """[N] kept answer tokens (Meta's rule, as `decode.generated_lengths`: cut at max_gen_len and before EOS)."""
    columns = np.arange(tokens.shape[1])[None, :]
    limit = np.minimum(prompt_lens + max_gen_lens, pos)[:, None]
    is_eos = (tokens == eos_id) & (columns >= prompt_lens[:, None]) & (columns < limit)
    return (np.min(np.where(is_eos, columns, limit), axis=1) - prompt_lens).astype(np.int32)


def slot_sample(params: dict, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], keys: Array, *,
                max_gen_len: Union[int, Sequence[int]], n_slots: int, width: Optional[int] = None,
                temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, eos_id: int = EOS_ID,
                pad_id: int = META_PAD_ID, mesh: Optional[Mesh] = None) -> dict[str, np.ndarray]:
    """Answers to `prompts` (N token lists, each 1 <= len <= width) decoded in `n_slots` decode slots.

    Args:
      params: the policy's params as they are (on device, sharded or not: used in place, not copied).
      keys: [N] PRNG keys, one per answer (`sample_keys`); answer i draws its token at position t from
        fold_in(keys[i], t), as `decode.sample` does for prompt i alone with rng=keys[i].
      max_gen_len: new tokens per answer, one int or one per prompt.
      width: the prompt width P of the output rows (default: the longest prompt); the slots' cache length is
        S = min(max_seq_len, P + max(max_gen_len)), `decode.sample`'s buffer for prompts padded to P.
      temperature (0 = greedy), top_p: as `decode.sample`. mesh: when given, the slots' KV caches are split over
        its data axes (the slot count rounded up to a multiple of the data-parallel size) and the KV heads over
        tensor (`slots.slot_state_shardings`), as the server does.
    Returns numpy arrays in prompt order, as `decode.sample`: tokens [N, S] (prompt + answer, pad_id after the
    answer's EOS or end), prompt_lens [N], lengths [N] (kept answer tokens, EOS excluded), done [N] (the answer
    ended with EOS), truncated [N] (cut at its max_gen_len or at the end of the buffer: `decode.truncated_rows`).
    """
    check_sampling(temperature, top_p)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts given")
    if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
        raise ValueError(f"n_slots must be an integer >= 1, got {n_slots!r}")
    gen_lens = _per_prompt(max_gen_len, n, "max_gen_len")
    longest = max(len(p) for p in prompts)
    width = longest if width is None else width
    for index, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= min(width, cfg.max_seq_len):
            raise ValueError(f"prompt {index} has {len(prompt)} tokens; a prompt needs 1 to "
                             f"{min(width, cfg.max_seq_len)} tokens")
    if keys.shape[0] != n:
        raise ValueError(f"{keys.shape[0]} PRNG keys for {n} prompts")
    keys = np.asarray(jax.device_get(keys))  # indexed on the host: no device op per insert
    size = min(cfg.max_seq_len, width + max(gen_lens))
    widths = slots.prefill_widths(min(width, size))
    n_slots = min(n_slots, n)
    if mesh is not None:  # the slots split over the data axes: a multiple of the data-parallel size
        n_slots = -(-n_slots // sh.data_parallel_size(mesh)) * sh.data_parallel_size(mesh)
    state = slots.init_slots(cfg, n_slots, size, jax.random.PRNGKey(0), temperature=temperature, top_p=top_p,
                             eos_id=eos_id, pad_id=pad_id)
    if mesh is not None:
        state = jax.device_put(state, slots.slot_state_shardings(state, mesh))
    out_tokens = np.full((n, size), pad_id, np.int32)
    out_pos, out_done = np.zeros((n,), np.int32), np.zeros((n,), bool)
    waiting, owner = collections.deque(range(n)), {}
    unplaced = collections.Counter(tuple(p) for p in prompts)
    prefixes = {}  # prompt -> its Prefix, kept until every answer to that prompt has a slot (GRPO's G samples)
    free = list(range(state.tokens.shape[0]))
    while waiting or owner:
        for slot in free:
            if not waiting:
                break
            i = waiting.popleft()
            prompt = tuple(prompts[i])
            if prompt not in prefixes:
                row = _padded(prompt, slots.prefill_width(len(prompt), widths), pad_id)
                prefixes[prompt] = slots.prefill_jit(params, cfg, row, np.int32(len(prompt)), pad_id=pad_id)
            state = insert_jit(state, prefixes[prompt], np.int32(slot), np.int32(gen_lens[i]), keys[i], pad_id=pad_id,
                               mesh=mesh)
            unplaced[prompt] -= 1
            if not unplaced[prompt]:
                del prefixes[prompt]
            owner[slot] = i
        state = steps_until_free_jit(params, cfg, state, np.int32(size), pad_id=pad_id, mesh=mesh)
        tokens, pos, done, is_free = jax.device_get((state.tokens, state.pos, state.done, slots.free_slots(state)))
        free = [slot for slot in range(len(is_free)) if is_free[slot]]
        for slot in free:
            if slot in owner:
                i = owner.pop(slot)
                out_tokens[i], out_pos[i], out_done[i] = tokens[slot], pos[slot], done[slot]
    prompt_lens = np.array([len(p) for p in prompts], np.int32)
    gen_lens = np.array(gen_lens, np.int32)
    lengths = _answer_lengths(out_tokens, prompt_lens, gen_lens, out_pos, eos_id)
    truncated = np.asarray(truncated_rows(out_tokens, prompt_lens, lengths, gen_lens, eos_id))
    return {"tokens": out_tokens, "prompt_lens": prompt_lens, "lengths": lengths, "done": out_done,
            "truncated": truncated}


def padded_rows(prompt_tokens, prompt_lens) -> list[list[int]]:
    """[B, P] right-padded prompts and their lengths [B] (host or device arrays) -> B token lists."""
    tokens, lens = jax.device_get((prompt_tokens, prompt_lens))
    return [np.asarray(row[:length]).tolist() for row, length in zip(tokens, lens)]
