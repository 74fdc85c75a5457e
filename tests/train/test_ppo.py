"""PPO: the action mask, chunked mapping, config errors, the per-token value model, and a tiny end-to-end run with a
stand-in reward model that prefers a visible property (response tokens from a fixed set): the mean reward rises over
a few iterations while the KL to π0 stays bounded, and the policy checkpoint is a valid init_from.

Covers llama2_jax.rlhf.rollout and llama2_jax.training.rlhf_setup."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.ppo_run import constant_safety, prefers_target_tokens, tiny_config
from helpers.rlhf_models import CFG, llama_params, make_tokenizer, save_policy

from configs import ppo_7b, ppo_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.model import score as score_model
from llama2_jax.rlhf import rollout as ppo_rollout
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.rlhf_setup import Rewards
from train import ppo


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


STAND_IN_REWARDS = Rewards({"helpful": prefers_target_tokens, "safety": constant_safety},
                           {"helpful": None, "safety": None})


def test_action_mask_covers_the_response_and_the_generated_eos():
    tokens = jnp.array([[1, 5, 6, 7, 2, -1], [1, 5, 7, 8, 9, 9], [1, 5, 6, 2, -1, -1]])
    mask = ppo_rollout.action_mask(tokens, jnp.array([2, 2, 3]), jnp.array([2, 3, 0]), eos_id=2)
    # row 0: tokens 2, 3 (response) and 4 (EOS) are actions -> positions 1..3; row 1: cut at max_gen_len, no EOS
    # row 2: an immediate EOS is the only action (position 2)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]])


def test_map_chunks_matches_one_call():
    x = {"a": jnp.arange(24.0).reshape(8, 3), "b": jnp.arange(8)}
    fn = lambda t: {"s": t["a"].sum(axis=1) * t["b"], "c": t["a"] * 2}  # noqa: E731
    whole, chunked = fn(x), ppo_rollout.map_chunks(fn, x, rows=2)
    assert all(np.array_equal(whole[k], chunked[k]) for k in whole)


def test_value_model_equals_the_reward_model_at_each_position():
    params = score_model.init_score_params_from_llama(llama_params(CFG, 0), jax.random.PRNGKey(1), 0.5)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, CFG.vocab_size)
    values = jax.jit(score_model.token_values, static_argnums=1)(params, CFG, tokens)
    scores = jax.jit(score_model.score_tokens, static_argnums=1)
    for t in (0, 4, 8):
        np.testing.assert_allclose(values[:, t], scores(params, CFG, tokens, jnp.array([t + 1] * 2)),
                                   rtol=1e-5, atol=1e-6)


def test_configs_carry_the_paper_settings_and_bad_fields_are_one_line_errors(tmp_path):
    config = ppo_7b.get_config()
    assert (config.batch_size, config.minibatch_size, config.learning_rate, config.beta, config.clip_ratio) == (
        512, 64, 1e-6, 0.01, 0.2)
    assert (config.adam_b1, config.adam_b2, config.adam_eps, config.weight_decay, config.grad_clip) == (
        0.9, 0.95, 1e-5, 0.1, 1.0)
    config.reward.helpful_path = "/rm"
    assert ppo.value_init_path(config) == "/rm"  # InstructGPT: the value model starts from the (helpful) RM
    config.value.init_from = "policy"
    assert ppo.value_init_path(config) == "" and config.reward.helpful_path == "/rm"
    config.value.init_from, config.reward.safety_path = "safety_rm", ""
    with pytest.raises(ConfigError, match=r"^config.value.init_from='safety_rm' but config.reward.safety_path"):
        ppo.value_init_path(config)
    config = ppo_tiny.get_config()
    config.init_from = str(save_policy(tmp_path / "policy", _tokenizer_stub(tmp_path)))
    config.minibatch_size = 5
    with pytest.raises(ConfigError, match=r"^config.batch_size \(16\) must be a positive multiple of "):
        ppo.train_and_evaluate(config, str(tmp_path / "w"))
    config.minibatch_size, config.sampling.max_gen_len = 8, 60
    with pytest.raises(ConfigError, match=r"max_gen_len \+ 1 exceeds the policy's max_seq_len 64"):
        ppo.train_and_evaluate(config, str(tmp_path / "w"))


def _tokenizer_stub(tmp_path):
    class Stub:
        model_path = str(tmp_path / "none.model")

    (tmp_path / "none.model").write_bytes(b"")
    return Stub()


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_ppo_raises_the_reward_with_bounded_kl(tmp_path, tokenizer):
    config = tiny_config(tmp_path, tokenizer)
    work = tmp_path / "ppo"
    history = ppo.train(config, str(work), STAND_IN_REWARDS).history

    rewards = [h["reward_combined"] for h in history]
    kls = [h["kl"] for h in history]
    assert [h["step"] for h in history] == list(range(1, 13))  # one row per iteration
    assert abs(kls[0]) < 1e-4  # π = π0 at the first rollout
    assert np.mean(rewards[-2:]) > rewards[0] + 0.15, rewards  # measured: 0.20 -> 0.65
    assert max(kls) < 30.0, kls  # nats per response of <= 17 actions (measured: 16 at iteration 12)
    assert all(h["reward_helpful"] == h["reward_combined"] for h in history)  # Rs = 0.9, untagged: Rc = Rh
    last = history[-1]
    for key in ("policy_loss", "value_loss", "policy_clipfrac", "entropy", "response_length",
                "generation_tokens_per_s", "training_tokens_per_s", "eval_reward_combined"):
        assert np.isfinite(last[key]), key
    assert last["policy_step"] == 12 * 4 and 0 <= last["policy_clipfrac"] <= 1
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))

    params, cfg = checkpoint.load_params(work)  # the workdir is an init_from for the next round
    assert cfg == checkpoint.load_config(config.init_from).replace(scan_layers=False, remat_policy="none")
    assert (work / "tokenizer.model").is_file() and sorted(p.name for p in (work / "checkpoints").iterdir()) == [
        "24", "48"]
    assert not np.allclose(params["output"], llama_params(CFG, 0)["output"])


@pytest.mark.slow
def test_sigterm_saves_and_the_next_run_resumes(tmp_path, tokenizer, monkeypatch):
    """SIGTERM during iteration 2 -> a checkpoint of iteration 2 and a clean return; a rerun goes on at 3."""
    config = tiny_config(tmp_path, tokenizer)
    config.iterations, config.checkpoint_every_iterations = 3, 100
    work = tmp_path / "ppo"
    run_iteration = ppo.run_iteration

    def terminated_in_iteration_2(*args, **kwargs):
        out = run_iteration(*args, **kwargs)
        if int(jax.device_get(out[0].step)) == 2 * 4:  # 4 minibatch steps per iteration
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ppo, "run_iteration", terminated_in_iteration_2)
    first = ppo.train(config, str(work), STAND_IN_REWARDS)
    assert [h["step"] for h in first.history] == [1, 2] and first.interrupted
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["8"]

    monkeypatch.setattr(ppo, "run_iteration", run_iteration)
    second = ppo.train(config, str(work), STAND_IN_REWARDS).history
    assert [h["step"] for h in second] == [3] and second[0]["policy_step"] == 12


def test_sequence_logprobs_are_the_tempered_softmax_of_the_next_token_by_hand():
    from llama2_jax.model.llama import Llama
    from llama2_jax.training import losses

    params = llama_params(CFG, 0)
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 0, CFG.vocab_size)
    logprobs, ent = jax.jit(lambda p, x: losses.sequence_logprobs(p, x, model=Llama(CFG), temperature=0.7))(params, ids)
    logits = np.asarray(Llama(CFG).apply({"params": params}, ids[:, :-1]), np.float64) / 0.7
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    expected = np.take_along_axis(log_p, np.asarray(ids[:, 1:])[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, -(np.exp(log_p) * log_p).sum(-1), rtol=1e-5, atol=1e-5)
