"""GRPO and RLOO: advantages (llama2_jax/rlhf/group.py) and losses (llama2_jax/training/losses.py) against
hand-computed values and numpy written after TRL's trainers (huggingface/trl, trl/trainer/grpo_trainer.py and
trl/trainer/rloo_trainer.py).

Covers llama2_jax.rlhf.group and llama2_jax.training.losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.rlhf import group
from llama2_jax.training import losses, state
from llama2_jax.training.checks import ConfigError
from tests.conftest import random_llama_params

# One compiled program per case instead of one per eager operation (the tests run on busy CPUs).
grpo_objective = jax.jit(losses.grpo_objective,
                         static_argnames=("beta", "clip_low", "clip_high", "aggregation", "max_completion_length"))
rloo_objective = jax.jit(losses.rloo_objective, static_argnames=("clip_low", "clip_high"))

# ----------------------------------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0]
    # group 1: mean 0.5, Bessel std sqrt(4 * 0.25 / 3); group 2: all equal; group 3: mean 2, std sqrt(2 / 3)
    s1, s3 = math.sqrt(1.0 / 3.0), math.sqrt(2.0 / 3.0)
    scaled = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
              1 / (s3 + 1e-4), -1 / (s3 + 1e-4), 0, 0]
    np.testing.assert_allclose(group.group_advantages(rewards, 4), scaled, rtol=1e-6)
    np.testing.assert_allclose(group.group_advantages(rewards, 4, scale_rewards=True), scaled, rtol=1e-6)
    centred = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0]
    np.testing.assert_allclose(group.group_advantages(rewards, 4, scale_rewards="none"), centred, atol=1e-7)
    np.testing.assert_allclose(group.group_advantages(rewards, 4, scale_rewards=False), centred, atol=1e-7)
    batch_std = np.std(rewards, ddof=1)
    np.testing.assert_allclose(group.group_advantages(rewards, 4, scale_rewards="batch"),
                               np.array(centred) / (batch_std + 1e-4), rtol=1e-6, atol=1e-7)


def test_group_reward_stats_count_groups_without_signal():
    stats = group.group_reward_stats([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], 2)
    np.testing.assert_allclose(stats["zero_std_fraction"], 2 / 3)
    np.testing.assert_allclose(stats["reward_mean"], 0.5)
    np.testing.assert_allclose(stats["reward_group_std"], math.sqrt(0.5) / 3, rtol=1e-6)


def test_one_generation_per_prompt_is_refused_with_the_field_name():
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ConfigError, match=r"^config\.grpo\.num_generations must be an integer >= 2") as error:
            group.check_group_size(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="config.grpo.num_generations"):
        group.group_advantages([1.0, 2.0], 1)
    with pytest.raises(ConfigError, match="config.grpo.num_generations"):
        group.leave_one_out_advantages([1.0, 2.0], 1)
    with pytest.raises(ConfigError, match=r"num_generations=4 does not divide the 6 completions"):
        group.group_advantages(np.zeros(6), 4)
    with pytest.raises(ConfigError, match=r"^config\.grpo\.scale_rewards must be one of group, batch, none"):
        group.scale_rewards_mode("std")


def test_leave_one_out_by_hand():
    # baselines: (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5; second group (0, 4): 4 and 0
    np.testing.assert_allclose(group.leave_one_out_advantages([1.0, 2.0, 6.0, 0.0, 4.0, 8.0], 3),
                               [-3.0, -1.5, 4.5, -6.0, 0.0, 6.0])
    np.testing.assert_allclose(group.leave_one_out_advantages([1.0, 3.0], 2), [-2.0, 2.0])
    advantages = np.array([-3.0, -1.5, 4.5, -6.0, 0.0, 6.0])
    np.testing.assert_allclose(group.normalize_advantages(advantages),
                               (advantages - advantages.mean()) / (advantages.std(ddof=1) + 1e-4), rtol=1e-6)


def test_rloo_rewards_subtract_the_summed_k1_kl():
    old = np.array([[-1.0, -2.0, -0.5], [-0.3, -0.4, -9.0]])
    ref = np.array([[-1.5, -1.0, -0.5], [-0.2, -0.6, 0.0]])
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # KL sums: (0.5 - 1.0) = -0.5 and (-0.1 + 0.2) = 0.1
    np.testing.assert_allclose(group.rloo_rewards([1.0, 2.0], old, ref, mask, beta=0.1), [1.05, 1.99], rtol=1e-6)
    np.testing.assert_allclose(group.rloo_rewards([1.0, 2.0], old, None, mask, beta=0.0), [1.0, 2.0])


# ----------------------------------------------------------------------------------------------------------------------
# GRPO loss: numpy after TRL's GRPOTrainer._compute_loss


def trl_grpo_loss(logps, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_completion_length=None):
    """TRL's formula line by line (token-level importance sampling, no delta, no vLLM correction), in numpy."""
    coef_1 = np.exp(logps - old)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (np.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(loss_type)


def random_batch(seed=2, rows=6, width=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, rows)
    starts = rng.integers(0, width - lengths + 1)
    index = np.arange(width)[None, :]
    mask = ((index >= starts[:, None]) & (index < (starts + lengths)[:, None])).astype(np.float32)
    old = -rng.uniform(0.1, 3.0, (rows, width)).astype(np.float32)
    logps = (old + rng.normal(0.0, 0.3, (rows, width))).astype(np.float32)  # several steps in: ratio != 1
    ref = (old + rng.normal(0.0, 0.5, (rows, width))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, rows).astype(np.float32)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("aggregation,loss_type", [("token", "bnpo"), ("sequence", "grpo"), ("constant", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_objective_matches_trl(aggregation, loss_type, beta):
    logps, old, ref, adv, mask = random_batch()
    assert np.abs(np.exp(logps - old) - 1).max() > 0.2  # both clip regions are reached
    for eps_high in (0.2, 0.28):
        loss_sum, aux = grpo_objective(logps, old, adv, mask, ref if beta else None, beta=beta, clip_low=0.2,
                                              clip_high=eps_high, aggregation=aggregation, max_completion_length=9)
        expected = trl_grpo_loss(logps, old, ref, adv, mask, beta, 0.2, eps_high, loss_type, 9)
        np.testing.assert_allclose(loss_sum / aux["weight"], expected, rtol=2e-6)
        ratio = np.exp(logps - old)
        low = (ratio < 0.8) & (adv[:, None] < 0)
        high = (ratio > 1 + eps_high) & (adv[:, None] > 0)
        assert low[mask > 0].any() and high[mask > 0].any()
        metrics = losses.per_token_means({k: float(v) / float(aux["weight"]) for k, v in aux.items()})
        np.testing.assert_allclose(metrics["clip_low"], low[mask > 0].mean(), rtol=1e-6)
        np.testing.assert_allclose(metrics["clipfrac"], (low | high)[mask > 0].mean(), rtol=1e-6)
        np.testing.assert_allclose(metrics["ratio"], ratio[mask > 0].mean(), rtol=1e-6)
        if beta:
            kl = np.exp(ref - logps) - (ref - logps) - 1
            np.testing.assert_allclose(metrics["kl"], kl[mask > 0].mean(), rtol=1e-5)
        else:
            assert "kl" not in aux


def test_grpo_by_hand_first_step():
    # Two completions of one prompt, first step (ratio 1): A = (+1, -1); lengths 2 and 1 (mask), beta = 0.
    logps = np.array([[-1.0, -2.0], [-0.5, -7.0]], np.float32)
    mask = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    token = grpo_objective(logps, logps, adv, mask, beta=0.0, aggregation="token")
    sequence = grpo_objective(logps, logps, adv, mask, beta=0.0, aggregation="sequence")
    constant = grpo_objective(logps, logps, adv, mask, beta=0.0, aggregation="constant",
                                     max_completion_length=4)
    # token: (-1 - 1 + 1) summed over 3 tokens; sequence: mean of -1 and +1; constant: -1 / (2 * 4)
    np.testing.assert_allclose([token[0], token[1]["weight"]], [-1.0, 3.0])
    np.testing.assert_allclose([sequence[0], sequence[1]["weight"]], [0.0, 2.0])
    np.testing.assert_allclose([constant[0], constant[1]["weight"]], [-1.0, 8.0])
    # gradient w.r.t. the log-probs at ratio 1 is -A per token, times the aggregation's token weight
    grad = jax.jit(jax.grad(lambda lp: grpo_objective(lp, logps, adv, mask, beta=0.0,
                                                             aggregation="sequence")[0]))(logps)
    np.testing.assert_allclose(grad, [[-0.5, -0.5], [1.0, 0.0]])


def test_grpo_k3_by_hand_and_the_reference_gets_no_gradient():
    logps = np.array([[-1.0, -2.0]], np.float32)
    ref = np.array([[-1.5, -1.0]], np.float32)
    mask = np.ones((1, 2), np.float32)
    # r = ref - logp = (-0.5, 1): k3 = e^-0.5 + 0.5 - 1 = 0.1065307, e^1 - 1 - 1 = 0.7182818
    np.testing.assert_allclose(losses.k3_kl(logps, ref), [[0.10653066, 0.71828183]], rtol=1e-6)
    loss_sum, aux = grpo_objective(logps, logps, np.zeros(1, np.float32), mask, ref, beta=0.1)
    np.testing.assert_allclose([loss_sum, aux["kl"]], [0.1 * 0.8248125, 0.8248125], rtol=1e-6)

    def loss_of(lp, old, reference):
        return grpo_objective(lp, old, np.ones(1, np.float32), mask, reference, beta=0.1)[0]

    d_logp, d_old, d_ref = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)))(logps, logps, ref)
    assert not np.any(d_old) and not np.any(d_ref)  # behaviour policy and reference are constants
    # d/dlogp: -A (ratio 1, unclipped) + beta * (1 - exp(ref - logp))
    np.testing.assert_allclose(d_logp, -1.0 + 0.1 * (1.0 - np.exp(ref - logps)), rtol=1e-6)
    with pytest.raises(ValueError, match="beta > 0 needs the reference"):
        grpo_objective(logps, logps, np.zeros(1), mask, None, beta=0.1)


def test_grpo_clip_removes_the_gradient_of_clipped_tokens():
    old = np.log(np.array([[0.5, 0.5, 0.5, 0.5]], np.float32))
    # ratios 1.5 (A > 0: clipped high), 0.5 (A > 0: not clipped, the min keeps the ratio), per row sign below
    logps = np.log(np.array([[0.75, 0.25, 0.75, 0.25]], np.float32))
    mask = np.ones((1, 4), np.float32)
    for sign, clipped in ((1.0, [1, 0, 1, 0]), (-1.0, [0, 1, 0, 1])):
        adv = np.array([sign], np.float32)
        loss_sum, aux = grpo_objective(logps, old, adv, mask, beta=0.0)
        ratio = np.array([1.5, 0.5, 1.5, 0.5])
        expected = -np.minimum(ratio * sign, np.clip(ratio, 0.8, 1.2) * sign).sum()
        np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)
        np.testing.assert_allclose(aux["clipfrac"], 2.0)
        grad = jax.jit(jax.grad(lambda lp, a=adv: grpo_objective(lp, old, a, mask, beta=0.0)[0]))(logps)
        np.testing.assert_allclose(grad[0], np.where(clipped, 0.0, -sign * ratio), rtol=1e-6)


def test_several_optimisation_steps_per_batch():
    """A table of logits as the policy: three SGD steps on one batch of rollouts; every step's loss is TRL's formula
    with the ratio to the behaviour policy that sampled the batch (1 only at the first step)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3, 5)).astype(np.float32)
    actions = rng.integers(0, 5, (4, 3))
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
    adv = np.asarray(group.group_advantages([1.0, 0.0, 0.0, 1.0], 2), np.float32)  # group (1, 0) and (0, 1)
    ref = rng.normal(-1.5, 0.3, (4, 3)).astype(np.float32)

    def logprobs_of(table):
        return jnp.take_along_axis(jax.nn.log_softmax(table), actions[..., None], axis=-1)[..., 0]

    old = np.asarray(logprobs_of(logits))

    @jax.jit
    def step(table):
        def loss(table):
            loss_sum, aux = grpo_objective(logprobs_of(table), old, adv, mask, ref, beta=0.04)
            return loss_sum / aux["weight"]

        value, grad = jax.value_and_grad(loss)(table)
        return value, logprobs_of(table), table - 2.0 * grad

    table = logits
    for index in range(3):
        value, logps, table = step(table)
        ratio = np.exp(np.asarray(logps) - old)
        assert (np.abs(ratio - 1)[mask > 0].max() < 1e-6) == (index == 0)
        np.testing.assert_allclose(value, trl_grpo_loss(np.asarray(logps), old, ref, adv, mask, 0.04, 0.2, 0.2,
                                                        "bnpo"), rtol=1e-5)
    assert np.abs(ratio - 1)[mask > 0].max() > 0.05


@pytest.mark.parametrize("aggregation", losses.GRPO_AGGREGATIONS)
def test_grpo_gradient_is_the_same_however_the_step_is_split(aggregation):
    """The loop's contract (sums / global weight) makes each aggregation exact over micro-batches: the gradient of
    6 rows in 3 micro-batches equals the gradient of TRL's loss on the 6 rows at once."""
    logps, old, ref, adv, mask = random_batch()
    rng = np.random.default_rng(5)
    features = rng.normal(size=logps.shape + (3,)).astype(np.float32)
    batch = {"x": features, "old": old, "ref": ref, "adv": adv, "mask": mask}
    weights = {"w": rng.normal(size=(3,)).astype(np.float32)}

    def loss_fn(params, batch):  # a policy whose log-probs are linear in the params, around the behaviour policy
        logprobs = batch["old"] + batch["x"] @ params["w"] * 0.3
        return losses.grpo_objective(logprobs, batch["old"], batch["adv"], batch["mask"], batch["ref"], beta=0.04,
                                     aggregation=aggregation, max_completion_length=9)

    @jax.jit
    def gradients(params):
        split = [state.accumulate_gradients(params, batch, loss_fn, n) for n in (1, 3)]
        full = jax.grad(lambda p: trl_loss_jnp(batch["old"] + batch["x"] @ p["w"] * 0.3, batch, aggregation))(params)
        return [g["w"] / aux["weight"] for _, aux, g in split], full["w"]

    (whole, split), reference = gradients(weights)
    assert np.abs(reference).max() > 1e-2
    np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split, reference, rtol=1e-5, atol=1e-7)


def trl_loss_jnp(logps, batch, aggregation):
    """`trl_grpo_loss` in jnp (to differentiate it), TRL's loss_type for each aggregation."""
    ratio = jnp.exp(logps - batch["old"])
    adv = batch["adv"][:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
    per_token = per_token + 0.04 * (jnp.exp(batch["ref"] - logps) - (batch["ref"] - logps) - 1)
    mask = batch["mask"]
    if aggregation == "sequence":
        return jnp.mean(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    if aggregation == "token":
        return jnp.sum(per_token * mask) / jnp.sum(mask)
    return jnp.sum(per_token * mask) / (mask.shape[0] * 9)


# ----------------------------------------------------------------------------------------------------------------------
# RLOO loss: numpy after TRL's RLOOTrainer._compute_loss


def test_rloo_objective_matches_trl_and_is_reinforce_at_ratio_one():
    logps, old, _, adv, mask = random_batch(seed=3)
    seq_ratio = np.exp(((logps - old) * mask).sum(1))
    expected = -np.minimum(seq_ratio * adv, np.clip(seq_ratio, 0.8, 1.28) * adv).mean()
    loss_sum, aux = rloo_objective(logps, old, adv, mask, clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss_sum / aux["weight"], expected, rtol=1e-6)
    np.testing.assert_allclose(aux["ratio"], seq_ratio.sum(), rtol=1e-6)
    # first step: the gradient is REINFORCE's -A_i ∇ Σ_t log π(o_it) (per sequence, summed over sequences)
    grad, d_old = jax.jit(jax.grad(lambda lp, o: rloo_objective(lp, o, adv, mask)[0], argnums=(0, 1)))(old, old)
    np.testing.assert_allclose(grad, -adv[:, None] * mask, rtol=1e-6)
    assert not np.any(d_old)


# ----------------------------------------------------------------------------------------------------------------------
# The batch wrappers on a tiny Llama


def test_grpo_and_rloo_losses_on_a_model_batch():
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, multiple_of=16, max_seq_len=16)
    model = Llama(cfg)
    params = random_llama_params(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (4, 9)).astype(np.int32)
    mask = np.zeros((4, 8), np.float32)
    mask[:, 3:] = 1.0
    mask[1, 6:] = 0.0
    adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
    valid = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # the last row is padding: it contributes nothing

    @jax.jit
    def run(params):
        logps, _ = losses.sequence_logprobs(params, ids, model=model, temperature=0.7)
        old, ref = logps - 0.1 * mask, logps + 0.2
        batch = {"ids": ids, "mask": mask * valid[:, None], "logprobs": old, "advantages": adv, "valid": valid,
                 "ref_logprobs": ref}
        grpo = losses.grpo_loss(params, batch, model=model, temperature=0.7, beta=0.1, aggregation="sequence")
        rloo = losses.rloo_loss(params, batch, model=model, temperature=0.7)
        direct_grpo = grpo_objective(logps, old, adv, mask, ref, beta=0.1, aggregation="sequence", valid=valid)
        direct_rloo = rloo_objective(logps, old, adv, mask, valid=valid)
        return grpo, rloo, direct_grpo, direct_rloo

    (grpo_sum, grpo_aux), (rloo_sum, rloo_aux), direct_grpo, direct_rloo = run(params)
    np.testing.assert_allclose([grpo_sum, rloo_sum], [direct_grpo[0], direct_rloo[0]], rtol=1e-5)
    np.testing.assert_allclose([grpo_aux["weight"], grpo_aux["tokens"], rloo_aux["weight"]], [3.0, mask[:3].sum(), 3.0])
    assert grpo_aux["entropy"] > 0 and grpo_aux["kl"] > 0


def test_unknown_aggregation_and_constant_without_length_are_refused():
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="unknown GRPO aggregation 'seq'; known: token, sequence, constant"):
        grpo_objective(x, x, np.zeros(1), x + 1, beta=0.0, aggregation="seq")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_objective(x, x, np.zeros(1), x + 1, beta=0.0, aggregation="constant")
