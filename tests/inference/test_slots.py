"""Decode slots (slots.prefill / insert / generate_step): independent requests at their own positions in one batch
decode the same greedy tokens as `decode.sample` does for each prompt alone."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import CFG, GEN_LEN, NO_EOS, PROMPTS, init_params

from llama2_jax.inference import decode, slots
from llama2_jax.inference import generate as gen

N_SLOTS = 3
WIDTH = 16  # the prefill bucket of every prompt here (one prefill compilation)
MAX_LEN = 40  # the slots' cache length: >= WIDTH, and >= the longest prompt + GEN_LEN


@pytest.fixture(scope="module")
def params():
    return init_params(CFG)


def reference_tokens(params, prompt, eos_id=NO_EOS) -> list[int]:
    """The greedy continuation `sample` keeps for the prompt (Meta's output rule)."""
    return gen.generate(params, CFG, [prompt], max_gen_len=GEN_LEN, temperature=0.0, eos_id=eos_id)[0]


def prefix_of(params, prompt):
    tokens = np.full((WIDTH,), decode.META_PAD_ID, np.int32)
    tokens[: len(prompt)] = prompt
    return slots.prefill_jit(params, CFG, jnp.asarray(tokens), len(prompt))


def slot_tokens(state, slot, eos_id=NO_EOS) -> list[int]:
    """The tokens slot `slot` generated, cut before EOS as Meta's output rule does."""
    start, stop = int(state.prompt_lens[slot]), int(state.pos[slot])
    row = np.asarray(state.tokens[slot, start:stop]).tolist()
    return row[: row.index(eos_id)] if eos_id in row else row


def run_requests(params, arrivals, eos_id=NO_EOS):
    """Serve prompts arriving at given steps ({step: prompt}) with N_SLOTS slots: insert each into the lowest free
    slot between steps, step until every slot is free. Returns {prompt index: generated tokens}."""
    state = slots.init_slots(CFG, N_SLOTS, MAX_LEN, jax.random.PRNGKey(0), temperature=0.0, eos_id=eos_id)
    assert np.asarray(slots.free_slots(state)).all()
    owner, results, step = {}, {}, 0
    while arrivals or owner:
        for slot in list(owner):
            if bool(slots.free_slots(state)[slot]):  # finished: hand the tokens back, free the slot
                results[owner.pop(slot)] = slot_tokens(state, slot, eos_id)
        for when in sorted(w for w in arrivals if w <= step):
            free = [s for s in range(N_SLOTS) if s not in owner]
            if not free:
                break
            index, prompt = arrivals.pop(when)
            state = slots.insert_jit(state, prefix_of(params, prompt), free[0], max_gen_len=GEN_LEN)
            owner[free[0]] = index
        state = slots.generate_step_jit(params, CFG, state)
        step += 1
        assert step < 100, "slots never finished"
    return results


def test_slots_decode_the_greedy_tokens_of_sample(params):
    # four prompts of different lengths, arriving at different steps, more requests than slots (one waits)
    arrivals = {0: (0, PROMPTS[1]), 1: (1, PROMPTS[0]), 3: (2, PROMPTS[2]), 4: (3, PROMPTS[3])}
    results = run_requests(params, dict(arrivals))
    assert sorted(results) == [0, 1, 2, 3]
    for index, prompt in arrivals.values():
        expected = reference_tokens(params, prompt)
        assert len(expected) == GEN_LEN
        assert results[index] == expected, index


def test_slot_stops_at_eos_and_is_reused(params):
    free = reference_tokens(params, PROMPTS[0])
    eos = free[2]  # the third generated token of prompt 0 becomes EOS
    arrivals = {0: (0, PROMPTS[0]), 1: (1, PROMPTS[1]), 2: (2, PROMPTS[0]), 3: (3, PROMPTS[2])}
    results = run_requests(params, dict(arrivals), eos_id=eos)
    for index, prompt in arrivals.values():
        assert results[index] == reference_tokens(params, prompt, eos_id=eos), index
    assert results[0] == free[:2]


def test_prefill_logits_match_the_full_forward(params):
    from helpers.generation import full_logits

    prompt = PROMPTS[1]
    prefix = prefix_of(params, prompt)
    expected = full_logits(params, CFG, np.asarray([prompt]))[0, -1]
    np.testing.assert_allclose(np.asarray(prefix.logits), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert int(prefix.length) == len(prompt) and prefix.cache[0]["k"].shape == (1, CFG.n_kv_heads, CFG.head_dim, WIDTH)


def test_bad_slot_shapes_are_one_line_errors(params):
    with pytest.raises(ValueError, match="max_len 200 exceeds max_seq_len 96"):
        slots.init_slots(CFG, 2, 200, jax.random.PRNGKey(0))
    state = slots.init_slots(CFG, 2, 8, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="prompt width 16 exceeds the slots' cache length 8"):
        slots.insert(state, prefix_of(params, PROMPTS[0]), 0, max_gen_len=GEN_LEN)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's copy insertion")
def test_generate_step_updates_the_slot_caches_in_place(params):
    """The per-slot cache writes (one scatter per layer buffer) alias the donated state: no cache-sized copy."""
    state = slots.init_slots(CFG, N_SLOTS, MAX_LEN, jax.random.PRNGKey(0), temperature=0.0)
    hlo = slots.generate_step_jit.lower(params, CFG, state).compile().as_text()
    cache_size = N_SLOTS * CFG.n_kv_heads * CFG.head_dim * MAX_LEN
    copied = [math.prod(int(d) for d in dims.split(",")) for dims in re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(",
                                                                                  hlo)]
    assert "input_output_alias" in hlo and all(size < cache_size for size in copied), copied


def serve_together(params, requests, logprobs=False):
    """Insert every (prompt, temperature, top_p, seed) into its own slot of one state, step until all are free.
    Returns the final state (slot i holds request i)."""
    state = slots.init_slots(CFG, len(requests), MAX_LEN, jax.random.PRNGKey(0), eos_id=NO_EOS, logprobs=logprobs)
    for slot, (prompt, temperature, top_p, seed) in enumerate(requests):
        state = slots.insert_jit(state, prefix_of(params, prompt), slot, max_gen_len=GEN_LEN,
                                  temperature=np.float32(temperature), top_p=np.float32(top_p),
                                  rng=jax.random.PRNGKey(seed))
    while not np.asarray(slots.free_slots(state)).all():
        state = slots.generate_step_jit(params, CFG, state)
    return state


def test_sampled_slots_draw_what_sample_draws_for_the_request_seed(params):
    # per-slot temperature / top_p / seed: each request's tokens equal `sample` for its prompt alone with its seed,
    # whatever its slot and neighbours (a greedy neighbour, the same prompt with another seed)
    requests = [(PROMPTS[1], 1.0, 0.9, 11), (PROMPTS[0], 0.0, 1.0, 0), (PROMPTS[1], 1.0, 0.9, 12),
                (PROMPTS[2], 0.7, 1.0, 3)]
    state = serve_together(params, requests)
    swapped = serve_together(params, requests[::-1])
    for slot, (prompt, temperature, top_p, seed) in enumerate(requests):
        expected = gen.generate(params, CFG, [prompt], max_gen_len=GEN_LEN, temperature=temperature, top_p=top_p,
                                eos_id=NO_EOS, rng=seed)[0]
        assert slot_tokens(state, slot) == expected, slot
        assert slot_tokens(swapped, len(requests) - 1 - slot) == expected, slot
    assert slot_tokens(state, 0) != slot_tokens(state, 2)  # the seed, not the slot, decides


def test_slot_logprobs_match_the_full_forward(params):
    from helpers.generation import full_logits

    requests = [(PROMPTS[1], 1.0, 1.0, 5), (PROMPTS[3], 0.0, 1.0, 0)]
    state = serve_together(params, requests, logprobs=True)
    for slot, (prompt, *_rest) in enumerate(requests):
        length = len(prompt) + GEN_LEN
        row = np.asarray(state.tokens[slot, :length])
        log_probs = np.asarray(jax.nn.log_softmax(full_logits(params, CFG, row[None])[0], axis=-1))  # [T, V]
        expected = log_probs[np.arange(length - 1), row[1:]]
        got = np.asarray(state.logprobs.chosen[slot, 1:length])
        np.testing.assert_allclose(got[len(prompt) - 1:], expected[len(prompt) - 1:], atol=1e-4)
        assert not got[: len(prompt) - 1].any()  # prompt positions are not recorded by the slot
        top = np.argsort(-log_probs[len(prompt) - 1: length - 1], axis=-1)[:, : slots.TOP_LOGPROBS]
        np.testing.assert_array_equal(np.asarray(state.logprobs.top_ids[slot, len(prompt):length]), top)
        np.testing.assert_allclose(np.asarray(state.logprobs.top_values[slot, len(prompt):length]),
                                   np.take_along_axis(log_probs[len(prompt) - 1: length - 1], top, axis=-1), atol=1e-4)
        if slot == 1:  # greedy: the chosen token is the top one
            np.testing.assert_array_equal(row[len(prompt):], top[:, 0])


def test_prompt_logprobs_match_the_full_forward(params):
    from helpers.generation import full_logits

    prompt = PROMPTS[1]
    tokens = np.full((WIDTH,), decode.META_PAD_ID, np.int32)
    tokens[: len(prompt)] = prompt
    lp = slots.prompt_logprobs_jit(params, CFG, jnp.asarray(tokens))
    log_probs = np.asarray(jax.nn.log_softmax(full_logits(params, CFG, np.asarray([prompt]))[0], axis=-1))
    expected = log_probs[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(np.asarray(lp.chosen[0, 1:len(prompt)]), expected, atol=1e-4)
    assert float(lp.chosen[0, 0]) == 0.0
    top = np.argsort(-log_probs[: len(prompt) - 1], axis=-1)[:, : slots.TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(lp.top_ids[0, 1:len(prompt)]), top)
