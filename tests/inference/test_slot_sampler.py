"""Rollouts through decode slots (inference.slot_sampler): greedy answers equal the fixed-batch sampler's token for
token; sampled answers are exactly what `decode.sample` draws for each prompt alone with the answer's key, whatever
the slot count or the prompt order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.inference import decode, slot_sampler, slots
from llama2_jax.inference import generate as gen
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=96,
                  dtype="float32")
NO_EOS = -7  # an id the model never produces
GEN_LEN = 24
# seven prompts of 1 to 21 tokens (two prefill widths: 16 and the output width 24)
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1], [1, 3, 4, 5], [1] + list(range(20, 40)), [1, 90, 91, 2, 3],
           [1, 50, 60, 70, 80, 90, 100, 110, 120, 11, 12, 13, 14, 15, 16, 17, 18]]
WIDTH = 24


@pytest.fixture(scope="module")
def params():
    """Random params; the output layer is scaled so that greedy argmaxes are not near-ties."""
    raw = nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return dict(raw, output=raw["output"] * 8.0)


def batch_sample(params, prompts, rng, **kwargs):
    """The fixed-batch sampler on the prompts padded to WIDTH (one batch)."""
    tokens, lens = gen.pad_prompts(prompts, decode.META_PAD_ID, CFG.max_seq_len, bucket=WIDTH)
    return jax.device_get(decode.sample_jit(params, CFG, jnp.asarray(tokens), jnp.asarray(lens), rng,
                                            max_gen_len=GEN_LEN, **kwargs))


def answers(out) -> list[list[int]]:
    return [row[start:start + n].tolist() for row, start, n in zip(out["tokens"], out["prompt_lens"], out["lengths"])]


def mixed_length_eos(params) -> int:
    """An id the greedy answers produce at different steps (and some never within GEN_LEN): as EOS it ends the
    answers at mixed lengths."""
    free = answers(batch_sample(params, PROMPTS, jax.random.PRNGKey(0), temperature=0.0, eos_id=NO_EOS))

    def first_steps(token):
        return {row.index(token) if token in row else GEN_LEN for row in free}

    return max(range(3, CFG.vocab_size), key=lambda t: (len(first_steps(t)), -t))


def test_greedy_answers_equal_the_fixed_batch_sampler(params):
    eos = mixed_length_eos(params)
    expected = batch_sample(params, PROMPTS, jax.random.PRNGKey(0), temperature=0.0, eos_id=eos)
    assert len(set(expected["lengths"].tolist())) >= 4, expected["lengths"]  # mixed answer lengths
    assert expected["truncated"].any() and not expected["truncated"].all()
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(3), np.arange(len(PROMPTS)), np.zeros(len(PROMPTS)))
    for n_slots in (1, 3, len(PROMPTS)):
        got = slot_sampler.slot_sample(params, CFG, PROMPTS, keys, max_gen_len=GEN_LEN, n_slots=n_slots, width=WIDTH,
                                       temperature=0.0, eos_id=eos)
        assert got["tokens"].shape == expected["tokens"].shape
        assert answers(got) == answers(expected), n_slots
        for name in ("prompt_lens", "lengths", "truncated"):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name}, {n_slots} slots")
        np.testing.assert_array_equal(got["done"], ~expected["truncated"])
        for row, start, n in zip(got["tokens"], got["prompt_lens"], got["lengths"]):  # EOS, then padding
            if n < GEN_LEN:
                assert row[start + n] == eos and (row[start + n + 1:] == decode.META_PAD_ID).all()


def test_sampled_answers_do_not_depend_on_slots_or_order_and_are_the_batch_samplers_draws(params):
    # 2 samples of each prompt; key (prompt, sample). Exact equality with the fixed-batch sampler run on each prompt
    # alone with rng = that answer's key: the slot draws position t from fold_in(key, t) as `decode.sample` does.
    eos = mixed_length_eos(params)
    rows = [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
    prompts = [PROMPTS[p] for p, _ in rows]
    rng = jax.random.PRNGKey(11)
    keys = slot_sampler.sample_keys(rng, [p for p, _ in rows], [s for _, s in rows])
    options = dict(max_gen_len=GEN_LEN, width=WIDTH, temperature=1.0, top_p=0.9, eos_id=eos)
    base = slot_sampler.slot_sample(params, CFG, prompts, keys, n_slots=3, **options)
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled = slot_sampler.slot_sample(params, CFG, [prompts[i] for i in order], keys[order], n_slots=5, **options)
    assert answers(shuffled) == [answers(base)[i] for i in order]
    np.testing.assert_array_equal(shuffled["truncated"], base["truncated"][order])
    assert len(set(base["lengths"].tolist())) >= 3, base["lengths"]
    for i, (p, s) in enumerate(rows):
        alone = batch_sample(params, [PROMPTS[p]], keys[i], temperature=1.0, top_p=0.9, eos_id=eos)
        assert answers(base)[i] == answers(alone)[0], (p, s)
        assert bool(base["truncated"][i]) == bool(alone["truncated"][0])
    assert answers(base)[0] != answers(base)[1]  # the sample index, not the prompt alone, decides


def test_per_prompt_max_gen_len_and_keys():
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(0), [0, 0, 1], [0, 1, 0])
    assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[0], keys[2])
    np.testing.assert_array_equal(keys[2], slot_sampler.sample_keys(jax.random.PRNGKey(0), [1], [0])[0])
    assert slots.prefill_widths(24) == [16, 24] and slots.prefill_widths(16) == [16]


def test_per_prompt_lengths_are_kept(params):
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(0), np.arange(3), np.zeros(3))
    out = slot_sampler.slot_sample(params, CFG, PROMPTS[:3], keys, max_gen_len=[5, 1, 12], n_slots=2,
                                   temperature=0.0, eos_id=NO_EOS)
    assert out["lengths"].tolist() == [5, 1, 12] and out["truncated"].all() and not out["done"].any()
    assert out["tokens"].shape == (3, max(len(p) for p in PROMPTS[:3]) + 12)
    full = batch_sample(params, PROMPTS[:3], jax.random.PRNGKey(0), temperature=0.0, eos_id=NO_EOS)
    assert answers(out) == [a[:n] for a, n in zip(answers(full), (5, 1, 12))]


def test_bad_arguments_are_one_line_errors(params):
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(0), [0, 1], [0, 0])
    call = lambda prompts, **kw: slot_sampler.slot_sample(params, CFG, prompts, keys, **{
        "max_gen_len": 4, "n_slots": 2, **kw})
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
        call([[1], []])
    with pytest.raises(ValueError, match="n_slots must be an integer >= 1"):
        call([[1], [2]], n_slots=0)
    with pytest.raises(ValueError, match="max_gen_len has 3 entries for 2 prompts"):
        call([[1], [2]], max_gen_len=[1, 2, 3])
    with pytest.raises(ValueError, match="3 PRNG keys for 2 prompts"):
        slot_sampler.slot_sample(params, CFG, [[1], [2]], jnp.concatenate([keys, keys[:1]]), max_gen_len=4, n_slots=2)
    with pytest.raises(ValueError, match="top_p must be in"):
        call([[1], [2]], top_p=0.0)


def test_slots_split_over_a_mesh_give_the_same_answers(params):
    # 3 slots -> 4 on a data=4 x tensor=2 mesh: the KV caches split over data (slots) and tensor (KV heads)
    from llama2_jax.model import sharding as sh

    mesh = sh.make_mesh(4, 1, 2, devices=jax.devices()[:8])
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(5), np.arange(len(PROMPTS)), np.zeros(len(PROMPTS)))
    options = dict(max_gen_len=GEN_LEN, n_slots=3, width=WIDTH, temperature=1.0, top_p=1.0, eos_id=NO_EOS)
    alone = slot_sampler.slot_sample(params, CFG, PROMPTS, keys, **options)
    sharded = slot_sampler.slot_sample(jax.device_put(params, sh.replicated(mesh)), CFG, PROMPTS, keys, mesh=mesh,
                                       **options)
    assert answers(sharded) == answers(alone)


def test_compiled_once_per_shape(params):
    # a second call with other prompts (same prefill widths), other per-answer lengths (the same longest: the slots'
    # cache length), keys and temperature compiles nothing
    programs = (slots.prefill_jit, slot_sampler.insert_jit, slot_sampler.steps_until_free_jit)
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(0), np.arange(3), np.zeros(3))
    slot_sampler.slot_sample(params, CFG, PROMPTS[:3], keys, max_gen_len=GEN_LEN, n_slots=2, width=WIDTH,
                             temperature=0.0, eos_id=NO_EOS)
    compiled = [program._cache_size() for program in programs]
    slot_sampler.slot_sample(params, CFG, [[1, 2], [1, 9, 9, 9, 9, 9], [1, 4, 4]], keys + 1, max_gen_len=[3, GEN_LEN, 5],
                             n_slots=2, width=WIDTH, temperature=0.8, top_p=0.7, eos_id=NO_EOS)
    assert [program._cache_size() for program in programs] == compiled
