"""RLHF math against values worked out by hand: the piecewise reward, logit and whitening, the per-token KL and
rewards, GAE, the clipped policy and value objectives, entropy and the best-of-K estimator."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.rlhf import formulas as rlhf


def close(actual, expected, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float64), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------- reward


def test_piecewise_reward_both_sides_of_the_threshold_and_safety_tags():
    helpful = jnp.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.2])
    safety = jnp.array([0.8, 0.1, 0.8, 0.15, 0.149, 0.95])
    is_safety = jnp.array([False, False, True, False, False, True])
    # 0.8 >= 0.15, untagged: Rh | 0.1 < 0.15: Rs | tagged: Rs | exactly 0.15 is not < 0.15: Rh | 0.149: Rs | tagged
    close(rlhf.combine_rewards(helpful, safety, is_safety), [0.9, 0.1, 0.8, 0.9, 0.149, 0.95])
    close(rlhf.combine_rewards(helpful, safety, is_safety, threshold=0.5), [0.9, 0.1, 0.8, 0.15, 0.149, 0.95])


def test_logit_undoes_the_sigmoid_and_clips_at_eps():
    close(rlhf.logit(jnp.array([0.5, 0.75, 0.2])), [0.0, math.log(3.0), math.log(0.25)])
    bound = math.log((1 - 1e-6) / 1e-6)  # 13.8155
    close(rlhf.logit(jnp.array([1.0, 0.0])), [bound, -bound], atol=0.02)  # float32 rounds 1 - 1e-6
    raw = jnp.array([-3.0, 0.1, 5.0])
    close(rlhf.logit(jax.nn.sigmoid(raw)), raw, atol=1e-4)


def test_whiten_over_the_batch_and_with_a_mask():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population std sqrt(1.25) = 1.1180340
    close(rlhf.whiten(x), [-1.3416408, -0.4472136, 0.4472136, 1.3416408])
    close(rlhf.whiten(x, shift_mean=False), [1.1583592, 2.0527864, 2.9472136, 3.8416408])  # the mean restored
    masked = rlhf.whiten(jnp.array([[1.0, 2.0], [3.0, 100.0]]), jnp.array([[1.0, 1.0], [1.0, 0.0]]))
    close(masked, [[-1.2247449, 0.0], [1.2247449, 0.0]])  # mean 2, std sqrt(2/3); the masked 100 is ignored
    close(rlhf.whiten(jnp.array([3.0, 3.0])), [0.0, 0.0])  # zero variance: eps keeps it finite


# ------------------------------------------------------------------------------------------------- per-token rewards


def test_kl_is_the_log_ratio_on_response_tokens():
    kl = rlhf.kl_per_token(jnp.array([[-1.0, -0.5, -2.0]]), jnp.array([[-1.5, -0.7, -1.0]]),
                           jnp.array([[0.0, 1.0, 1.0]]))
    close(kl, [[0.0, 0.2, -1.0]])  # k1: single tokens may be negative


def test_rewards_charge_kl_everywhere_and_add_the_score_at_the_last_token():
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    close(rlhf.last_token_mask(mask), [[0, 0, 1, 0], [0, 0, 0, 1]])
    kl = jnp.array([[0.0, 0.2, -1.0, 0.0], [0.1, 0.1, 0.1, 0.3]])
    rewards = rlhf.token_rewards(jnp.array([2.0, -1.0]), kl, mask, beta=0.1)
    close(rewards, [[0.0, -0.02, 0.1 + 2.0, 0.0], [-0.01, -0.01, -0.01, -0.03 - 1.0]])


def test_gae_on_a_hand_worked_example():
    # Row 0: a prompt token, then 3 response tokens. Row 1: 2 response tokens, then padding that must not leak.
    rewards = jnp.array([[0.0, -0.1, 0.2, 1.0], [0.5, 1.0, 9.0, 9.0]])
    values = jnp.array([[0.5, 0.4, 0.3, 0.6], [0.2, 0.1, 7.0, 7.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    advantages, returns = rlhf.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d3 = 1 - 0.6 = 0.4;  d2 = 0.2 + 0.9*0.6 - 0.3 = 0.44,  A2 = 0.44 + 0.72*0.4 = 0.728
    #        d1 = -0.1 + 0.9*0.3 - 0.4 = -0.23,  A1 = -0.23 + 0.72*0.728 = 0.29416
    # row 1: A1 = 1 - 0.1 = 0.9;  d0 = 0.5 + 0.9*0.1 - 0.2 = 0.39,  A0 = 0.39 + 0.72*0.9 = 1.038
    close(advantages, [[0.0, 0.29416, 0.728, 0.4], [1.038, 0.9, 0.0, 0.0]])
    close(returns, [[0.0, 0.69416, 1.028, 1.0], [1.238, 1.0, 0.0, 0.0]])
    advantages, _ = rlhf.gae(rewards[:1], values[:1], mask[:1])  # defaults gamma 1, lambda 0.95
    # d3 = 0.4; d2 = 0.2 + 0.6 - 0.3 = 0.5, A2 = 0.5 + 0.95*0.4 = 0.88; d1 = -0.2, A1 = -0.2 + 0.95*0.88 = 0.636
    close(advantages, [[0.0, 0.636, 0.88, 0.4]])


# ------------------------------------------------------------------------------------------------------ objectives


def test_clipped_policy_objective_in_both_regimes_and_its_gradient():
    advantages = jnp.array([1.0, 1.0, -1.0, -1.0, 2.0])
    ratios = jnp.array([1.5, 0.5, 0.5, 1.5, 1.1])
    old = jnp.array([-1.0, -2.0, -0.5, -3.0, -1.2])
    logprobs = old + jnp.log(ratios)
    loss, clipped = rlhf.policy_objective(logprobs, old, advantages, clip=0.2)
    # A>0, rho 1.5: max(-1.5, -1.2) = -1.2 clipped | A>0, rho 0.5: max(-0.5, -0.8) = -0.5 (pessimistic, unclipped)
    # A<0, rho 0.5: max(0.5, 0.8) = 0.8 clipped     | A<0, rho 1.5: max(1.5, 1.2) = 1.5 unclipped | inside: -2.2
    close(loss, [-1.2, -0.5, 0.8, 1.5, -2.2])
    close(clipped, [1, 0, 0 + 1, 0, 0])
    grad = jax.grad(lambda lp: jnp.sum(rlhf.policy_objective(lp, old, advantages)[0]))(logprobs)
    close(grad, [0.0, -0.5, 0.0, 1.5, -2.2])  # d(-A rho)/d logp = -A rho; 0 where clipped


def test_clipped_value_loss():
    values = jnp.array([1.0, 0.6, 0.0, 1.0, 0.0])
    old = jnp.full((5,), 0.5)
    returns = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    loss, clipped = rlhf.value_objective(values, old, returns, clip=0.2)
    # V clipped to [0.3, 0.7]: 0.5*max(0, 0.09) | 0.5*0.16 both | 0.5*max(1, 0.49) | 0.5*max(1, 0.49) | 0.5*max(0, .09)
    close(loss, [0.045, 0.08, 0.5, 0.5, 0.045])
    close(clipped, [1, 0, 0, 0, 1])


def test_entropy_and_approx_kl():
    logits = jnp.log(jnp.array([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 1e-30, 1e-30]]))
    close(rlhf.entropy(logits), [math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    close(rlhf.approx_kl(jnp.array([-1.0]), jnp.array([-1.5])), [0.125])


def test_masked_mean():
    close(rlhf.masked_mean(jnp.array([[1.0, 5.0], [3.0, 7.0]]), jnp.array([[1.0, 0.0], [1.0, 1.0]])), 11.0 / 3.0)


# ------------------------------------------------------------------------------------------------------- best of K


def test_best_of_k_on_a_hand_example():
    # prompt 0: sorted 0.1, 0.3, 0.5 -> k=2: pairs {.1,.5}->.5 {.1,.3}->.3 {.5,.3}->.5, mean 1.3/3; prompt 1 constant
    curve = rlhf.best_of_k_curve([[0.1, 0.5, 0.3], [1.0, 1.0, 1.0]])
    close(curve, [(0.3 + 1.0) / 2, (1.3 / 3 + 1.0) / 2, (0.5 + 1.0) / 2])


def test_best_of_k_equals_the_mean_over_all_subsets_and_never_decreases():
    scores = np.random.default_rng(0).uniform(size=(3, 6))
    curve = rlhf.best_of_k_curve(scores)
    for k in range(1, 7):
        exhaustive = np.mean([np.mean([max(row[list(c)]) for c in itertools.combinations(range(6), k)])
                              for row in scores])
        assert curve[k - 1] == pytest.approx(exhaustive, abs=1e-12)
    assert np.all(np.diff(curve) >= 0)
    assert curve[0] == pytest.approx(scores.mean()) and curve[-1] == pytest.approx(scores.max(axis=1).mean())
