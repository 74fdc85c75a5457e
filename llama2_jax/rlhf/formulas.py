"""RLHF math (paper section 3.2.3): the piecewise reward, logit + whitening, the per-token KL penalty, GAE, the clipped
PPO objectives, scoring sampled sequences with the reward models, and the best-of-K curve of rejection sampling. Pure
functions, unit-tested on hand-computed values.

Shape legend: B batch (sequences), T per-token positions, K samples per prompt. Per-token arrays are [B, T] and come
with a `mask` [B, T] (1.0 on *response* tokens, the policy's actions; 0.0 on prompt and padding). In `train.ppo`
position j holds the action token `tokens[:, j + 1]`: its log-probability comes from the logits at j and its value is
V(tokens[:, :j + 1]) from the hidden state at j. The response is one contiguous run of 1s in each row.

The paper fixes: the piecewise rule with the 0.15 threshold, R̃c = whiten(logit(Rc)), R = R̃c - β·KL, the ratio
clip 0.2 and β. It leaves the rest open (the KL estimator, whitening statistics, GAE, the critic); the choices here
follow InstructGPT / TRL's PPO:

* **KL**: per token, the k1 estimator log πθ(a_t|s_t) - log π0(a_t|s_t) on the *sampled* tokens (unbiased for
  KL(πθ‖π0) of the sequence when summed over its tokens; single tokens can be negative). β·KL is charged at every
  response token (`token_rewards`), and R̃c is added at the last response token (InstructGPT / TRL).
* **Whitening** (`whiten`): (x - mean) / (std + eps) over the batch (masked entries only), population std (ddof 0).
  By default the mean is subtracted and *not* restored (shift_mean=True); TRL's `whiten(..., shift_mean=False)`
  restores it. TRL divides by sqrt(var_unbiased + 1e-8) instead: it differs by O(1/N) for a batch of N.
* **GAE**: γ = 1, λ = 0.95 (TRL's defaults). The token after the last response token is terminal (value 0), also for
  responses cut by max_gen_len (TRL does the same). Advantages are then whitened over the batch (TRL).
* **Value loss**: TRL's clipped loss 0.5·max((V - R)², (clip(V, V_old ± 0.2) - R)²).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Any, Array, Array], Array]  # (params, tokens [B, T], lengths [B]) -> sigmoid scores [B]
REWARD_NAMES = ("helpful", "safety")  # the two reward models of the paper (section 3.2.2)
META_PAD_ID = -1  # the sampler's padding (Llama 2's tokenizer has no pad piece; generate.META_PAD_ID)

SAFETY_THRESHOLD = 0.15  # Rs below this counts as unsafe whatever the prompt's tag (precision 0.89, recall 0.55)
LOGIT_EPS = 1e-6  # sigmoid scores are clipped to [eps, 1 - eps] before the logit: |logit| <= 13.8
WHITEN_EPS = 1e-8  # added to the standard deviation
GAMMA = 1.0  # GAE discount (TRL default; the paper is silent)
LAMBDA = 0.95  # GAE lambda (TRL default)
CLIP_RATIO = 0.2  # paper: PPO clip 0.2
CLIP_VALUE = 0.2  # TRL's cliprange_value


# ----------------------------------------------------------------------------------------------------------------------
# Reward: piecewise combination, logit, whitening


def combine_rewards(helpful: Array, safety: Array, is_safety: Array, threshold: float = SAFETY_THRESHOLD) -> Array:
    """Rc = Rs if is_safety(prompt) or Rs < threshold, else Rh. Sigmoid scores in [0, 1]; shapes [B] -> [B]."""
    use_safety = jnp.asarray(is_safety, bool) | (jnp.asarray(safety) < threshold)
    return jnp.where(use_safety, safety, helpful)


def logit(p: Array, eps: float = LOGIT_EPS) -> Array:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps] (float32 sigmoid scores saturate at exactly 0 or 1)."""
    p = jnp.clip(jnp.asarray(p, jnp.float32), eps, 1.0 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def masked_mean(x: Array, mask: Array | None = None, axis=None) -> Array:
    """Mean of x over the entries where mask is 1 (all entries without a mask)."""
    if mask is None:
        return jnp.mean(x, axis=axis)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x: Array, mask: Array | None = None, *, shift_mean: bool = True, eps: float = WHITEN_EPS) -> Array:
    """(x - mean) / (std + eps) over all (masked) entries of x; population std. shift_mean=False adds the mean back
    (TRL's option). Entries outside the mask are returned as 0."""
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    std = jnp.sqrt(masked_mean(jnp.square(x - mean), mask))
    out = (x - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask


# ----------------------------------------------------------------------------------------------------------------------
# Scoring sampled sequences with the reward models (rejection sampling and PPO)


def scoring_sequences(tokens: Array, prompt_lens: Array, lengths: Array, eos_id: int, pad_id: int = META_PAD_ID
                      ) -> tuple[Array, Array]:
    """Sampler output -> what the reward models score: [B, S + 1] = prompt + kept response + EOS (written after the
    kept response, which already ends there with an EOS unless it was cut at max_gen_len: the reward models read
    their score at the EOS that ends an answer), padding -> 0; and the lengths [B].

    tokens [B, S] (prompt + response, right-padded with pad_id), prompt_lens [B], lengths [B] kept response tokens."""
    ids = jnp.where(tokens == pad_id, 0, tokens)
    ids = jnp.concatenate([ids, jnp.zeros_like(ids[:, :1])], axis=1)
    end = prompt_lens + lengths  # [B] slot after the kept response
    ids = jnp.where(jnp.arange(ids.shape[1])[None, :] == end[:, None], eos_id, ids)
    return ids, end + 1


def score_sequences(score_fns: dict[str, ScoreFn], reward_params: dict, tokens: Array, lengths: Array,
                    is_safety: Array, threshold: float = SAFETY_THRESHOLD) -> dict[str, Array]:
    """{"helpful", "safety" (those given), "combined"}: sigmoid scores [B]; combined by the piecewise rule
    (`combine_rewards`) when both reward models are given, else the one model's score."""
    scores = {name: fn(reward_params[name], tokens, lengths) for name, fn in score_fns.items()}
    if len(scores) == 2:
        scores["combined"] = combine_rewards(scores["helpful"], scores["safety"], is_safety, threshold)
    else:
        scores["combined"] = next(iter(scores.values()))
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# Per-token rewards


def kl_per_token(logprobs: Array, ref_logprobs: Array, mask: Array) -> Array:
    """k1 estimate of the KL penalty per sampled token: (log πθ - log π0) on response tokens, 0 elsewhere. [B, T]."""
    return (logprobs - ref_logprobs) * mask


def last_token_mask(mask: Array) -> Array:
    """1.0 at the last response token of each row (the 1 followed by a 0 or the row's end). [B, T] -> [B, T]."""
    following = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return mask * (1.0 - following)


def token_rewards(score: Array, kl: Array, mask: Array, beta: float) -> Array:
    """R_t = -β·KL_t at every response token, plus the sequence score (R̃c [B]) at the last one. [B, T]."""
    return -beta * kl * mask + score[:, None] * last_token_mask(mask)


def gae(rewards: Array, values: Array, mask: Array, gamma: float = GAMMA, lam: float = LAMBDA
        ) -> tuple[Array, Array]:
    """Generalised advantage estimation with a backwards `lax.scan` over T.

    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γλ·A_{t+1} on response tokens, where V_{t+1} and A_{t+1} are 0 after
    the last response token (terminal) and everything is 0 outside the mask. Returns (advantages, returns = A + V),
    both [B, T] and 0 outside the mask.
    """
    rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))

    def step(carry, inputs):
        next_value, next_advantage = carry
        r, v, m = inputs  # [B] each: one time step
        advantage = (r + gamma * next_value - v + gamma * lam * next_advantage) * m
        return (v * m, advantage), advantage

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------------------------------------------------
# PPO objectives (per token; callers sum them over the mask)


def policy_objective(logprobs: Array, old_logprobs: Array, advantages: Array, clip: float = CLIP_RATIO
                     ) -> tuple[Array, Array]:
    """Clipped surrogate loss per token, max(-A·ρ, -A·clip(ρ, 1 - ε, 1 + ε)) with ρ = exp(log π - log π_old),
    and whether the clipped branch was taken (1.0 = clipped: no gradient). Returns (loss [B, T], clipped [B, T])."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def value_objective(values: Array, old_values: Array, returns: Array, clip: float = CLIP_VALUE
                    ) -> tuple[Array, Array]:
    """TRL's clipped value loss per token, 0.5·max((V - R)², (V_old + clip(V - V_old, ±ε) - R)²), and whether the
    clipped term was the larger. Returns (loss [B, T], clipped [B, T])."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    loss_unclipped = jnp.square(values - returns)
    loss_clipped = jnp.square(clipped_values - returns)
    return 0.5 * jnp.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).astype(jnp.float32)


def entropy(logits: Array) -> Array:
    """Entropy of softmax(logits) per position, -Σ p log p in float32: [..., V] -> [...]."""
    log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def approx_kl(logprobs: Array, old_logprobs: Array) -> Array:
    """0.5·(log π - log π_old)² per token: how far one update moved the policy (a diagnostic, as in TRL)."""
    return 0.5 * jnp.square(logprobs - old_logprobs)


# ----------------------------------------------------------------------------------------------------------------------
# Rejection sampling: expected best-of-k


def best_of_k_curve(scores) -> np.ndarray:
    """Expected max reward of k samples, k = 1..K, from K samples per prompt: scores [N, K] -> [K] (mean over prompts).

    The unbiased estimator of E[max of k draws] from K i.i.d. draws (all k-subsets equally likely): with the scores
    of a prompt sorted ascending s_1 <= ... <= s_K, E[max_k] = Σ_{i=k..K} C(i-1, k-1) / C(K, k) · s_i. k = 1 gives the
    mean, k = K the max, and the curve never decreases in k."""
    scores = np.sort(np.asarray(scores, np.float64), axis=1)
    n_samples = scores.shape[1]
    curve = np.zeros(n_samples)
    for k in range(1, n_samples + 1):
        weights = np.array([math.comb(i - 1, k - 1) for i in range(1, n_samples + 1)], np.float64)
        curve[k - 1] = np.mean(scores @ (weights / math.comb(n_samples, k)))
    return curve
