"""config.rollout in the RLHF trainers: the decode-slot engine and the fixed-batch sampler give the same greedy rollouts
through each trainer's own sampling function (PPO, GRPO, rejection sampling, context distillation), and a bad
config.rollout is a one-line ConfigError naming the field."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, cd_tiny, grpo_tiny, rs_tiny
from llama2_jax.inference import decode, slot_sampler
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.rlhf import rollout
from llama2_jax.training.checks import ConfigError
from train import context_distill as cd
from train import grpo
from train import rejection_sampling as rs

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=96,
                  dtype="float32")
WIDTH, GEN_LEN = 16, 12
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1], [1, 3, 4, 5], [1, 90, 91, 2, 3, 60, 61, 62, 63, 64, 65, 66]]


@pytest.fixture(scope="module")
def params():
    raw = nn.unbox(Llama(CFG).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"])
    return dict(raw, output=raw["output"] * 8.0)  # no greedy near-ties


@pytest.fixture(scope="module")
def eos(params) -> int:
    """An id the greedy answers reach at different steps (some never): answers of mixed lengths."""
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(0), np.arange(len(PROMPTS)), np.zeros(len(PROMPTS)))
    out = slot_sampler.slot_sample(params, CFG, PROMPTS, keys, max_gen_len=GEN_LEN, n_slots=len(PROMPTS),
                                   temperature=0.0, eos_id=-7)
    free = [row[s:].tolist() for row, s in zip(out["tokens"], out["prompt_lens"])]
    steps = lambda t: {row.index(t) if t in row else GEN_LEN for row in free}
    return max(range(3, CFG.vocab_size), key=lambda t: (len(steps(t)), -t))


@pytest.fixture(scope="module")
def mesh():
    return sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def token_score(params, tokens, lengths):
    """A stand-in reward model: a deterministic function of the scored tokens [B, S] before `lengths` [B] (a causal
    reward model reads nothing after the EOS that ends the sequence; the fixed-batch sampler leaves tokens there, the
    slots padding). Sigmoid scores [B]."""
    kept = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return jax.nn.sigmoid(params + jnp.sum(jnp.where(kept, tokens, 0), axis=1) / 500.0 - lengths / 7.0)


def rlhf_config(module, engine: str, **sampling):
    config = module.get_config()
    config.rollout.engine = engine
    config.prompts.max_prompt_len = WIDTH
    config.sampling.update(dict(temperature=0.0, max_gen_len=GEN_LEN, **sampling))
    return config


def answers(out) -> list[list[int]]:
    return [row[s:s + n].tolist() for row, s, n in zip(out["tokens"], out["prompt_lens"], out["lengths"])]


def test_rejection_sampling_rows_are_the_same_with_either_engine(params, eos, mesh):
    prompts = [types.SimpleNamespace(is_safety=i % 2 == 0) for i in range(len(PROMPTS))]
    got = {}
    for engine in ("slots", "batch"):
        config = rlhf_config(rs_tiny, engine, num_samples=2, batch_size=4)
        sampler = rs.make_sampler(config, CFG, {"helpful": token_score}, eos, mesh)
        assert isinstance(sampler, rs.SlotSampler) == (engine == "slots")
        got[engine] = rs.sample_all(config, sampler, params, {"helpful": jnp.float32(0.5)}, PROMPTS, prompts, 0, mesh)
    assert got["slots"]["responses"] == got["batch"]["responses"]
    assert len({len(r) for rows in got["slots"]["responses"] for r in rows}) >= 3  # mixed lengths
    np.testing.assert_array_equal(got["slots"]["truncated"], got["batch"]["truncated"])
    assert got["slots"]["truncated"].any() and not got["slots"]["truncated"].all()
    for name in ("helpful", "combined"):
        np.testing.assert_allclose(got["slots"]["scores"][name], got["batch"]["scores"][name], rtol=1e-6)


def test_context_distillation_rows_are_the_same_with_either_engine(params, eos, mesh):
    with_pre, without = PROMPTS[:4], [p[:2] for p in PROMPTS[:4]]
    got = {}
    for engine in ("slots", "batch"):
        config = rlhf_config(cd_tiny, engine, batch_size=4)
        sampler = cd.make_sampler(config, CFG, token_score, eos, mesh)
        got[engine] = cd.sample_both(config, sampler, params, jnp.float32(0.0), with_pre, without, mesh)
    assert got["slots"]["answers"] == got["batch"]["answers"]
    np.testing.assert_allclose(got["slots"]["scores"], got["batch"]["scores"], rtol=1e-6)


def test_grpo_and_ppo_rollouts_are_the_same_with_either_engine(params, eos, mesh):
    tokens = np.full((len(PROMPTS), WIDTH), decode.META_PAD_ID, np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = p
    lens = np.array([len(p) for p in PROMPTS], np.int32)
    outs = []
    for engine in ("slots", "batch"):
        config = grpo_tiny.get_config()
        config.rollout.engine, config.sampling.max_gen_len, config.grpo.num_generations = engine, GEN_LEN, 5
        sample_fn = grpo.make_phases(config, CFG, mesh, None, eos, {})[0]
        outs.append(jax.device_get(sample_fn(params, jnp.asarray(tokens), jnp.asarray(lens), jax.random.PRNGKey(0),
                                             0.0)))  # greedy: the held-out evaluation's call
    settings = rollout.Settings(max_gen_len=GEN_LEN, temperature=0.0, top_p=1.0, eos_id=eos, beta=0.0, gamma=1.0,
                                lam=1.0, clip_ratio=0.2, clip_value=0.2, whiten_advantages=True,
                                safety_threshold=0.15, minibatch_size=1, ppo_epochs=1, grad_accum_steps=1,
                                chunk_rows=0)
    outs.append(rollout.rollout_with_slots(params, tokens, lens, jax.random.PRNGKey(0), cfg=CFG, settings=settings,
                                           n_slots=2, mesh=mesh))
    outs.append(jax.device_get(jax.jit(lambda p, t, n, r: rollout.rollout(p, t, n, r, cfg=CFG, settings=settings,
                                                                          mesh=mesh))(params, tokens, lens,
                                                                                      jax.random.PRNGKey(0))))
    for out in outs[1:]:
        assert out["tokens"].shape == outs[0]["tokens"].shape
        assert answers(out) == answers(outs[0])
        for name in ("prompt_lens", "lengths", "truncated"):
            np.testing.assert_array_equal(out[name], outs[0][name], err_msg=name)


def test_grpo_samples_of_a_prompt_draw_with_their_own_keys(params, mesh):
    # rows p·G + g draw with sample_keys(rng, p, g): the G answers of a prompt differ, and the same (p, g) row gives
    # the same answer when another prompt's rows change
    config = grpo_tiny.get_config()
    config.sampling.max_gen_len, config.grpo.num_generations = GEN_LEN, 3
    sample_fn = grpo.make_phases(config, CFG, mesh, None, -7, {})[0]

    def run(prompts):
        rows = [p for p in prompts for _ in range(3)]
        tokens = np.full((len(rows), WIDTH), decode.META_PAD_ID, np.int32)
        for i, p in enumerate(rows):
            tokens[i, :len(p)] = p
        lens = np.array([len(p) for p in rows], np.int32)
        return answers(sample_fn(params, tokens, lens, jax.random.PRNGKey(4), 1.0))

    first, second = run([PROMPTS[0], PROMPTS[1]]), run([PROMPTS[0], PROMPTS[3]])
    assert len({tuple(a) for a in first[:3]}) == 3
    assert first[:3] == second[:3] and first[3:] != second[3:]


def test_bad_rollout_fields_are_one_line_errors():
    config = base.get_config()
    config.rollout.engine = "fast"
    with pytest.raises(ConfigError, match=r"^config.rollout.engine='fast'; known: slots, batch$"):
        rollout.check_engine(config)
    config = grpo_tiny.get_config()
    config.rollout.engine = "fast"
    with pytest.raises(ConfigError, match="config.rollout.engine='fast'"):
        grpo.check_fields(config)  # the trainers check it before anything is read or compiled
    config = base.get_config()
    config.rollout.slots = -1
    with pytest.raises(ConfigError, match="config.rollout.slots=-1 must be an integer >= 0"):
        rollout.check_engine(config)
    config = base.get_config()
    with pytest.raises(ConfigError, match="this job has 2: use config.rollout.engine='batch'"):
        rollout.check_engine(config, process_count=2)
    config.rollout.engine = "batch"
    rollout.check_engine(config, process_count=2)
    assert rollout.slot_count(config, 64) == 64
    config.rollout.slots = 8
    assert rollout.slot_count(config, 64) == 8
