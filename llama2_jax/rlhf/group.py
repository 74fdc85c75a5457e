"""Critic-free advantages from G sampled completions per prompt: GRPO's group-normalised rewards (Shao et al. 2024,
DeepSeekMath, section 4.1.2) and RLOO's leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740).

Layout: rewards [B] with B = P·G, the G completions of prompt p in rows p·G .. p·G + G - 1 (adjacent, as TRL's
`repeat_interleave`). The formulas are TRL's (huggingface/trl, trl/trainer/grpo_trainer.py
`_generate_and_score_completions` and trl/trainer/rloo_trainer.py), including the Bessel-corrected standard deviation
and its 1e-4; tests/rlhf/test_grpo.py checks them against hand-computed values.

`scale_rewards` (TRL's option of the same name; True = "group", False = "none"):
  "group"  A_i = (r_i - mean(group)) / (std(group) + 1e-4)   DeepSeekMath's outcome supervision. The default: the
           advantages do not depend on the units of the reward (a Python reward function scoring 0/100 and one scoring
           0/1 train alike at the same learning rate), which matters when rewards come from user code and from
           reward models in one run; it is also TRL's default, so results compare with the most used implementation.
  "batch"  A_i = (r_i - mean(group)) / (std(batch) + 1e-4)   (PPO-Lite; TRL "batch")
  "none"   A_i = r_i - mean(group)                           Dr. GRPO (Liu et al. 2025, section 3.1): dividing by the
           group's std up-weights prompts that are too easy or too hard (small std), a question-level difficulty bias.
A group whose G rewards are equal has advantage 0 everywhere: no learning signal (`group_reward_stats` counts them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama2_jax.training.checks import ConfigError

Array = jax.Array
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the standard deviation (TRL)


def scale_rewards_mode(value, field: str = "config.grpo.scale_rewards") -> str:
    """The scale_rewards mode from a config value: one of SCALE_REWARDS, or True ("group") / False ("none") as TRL
    accepts; anything else is a one-line ConfigError naming the field."""
    if isinstance(value, bool):
        return "group" if value else "none"
    if value not in SCALE_REWARDS:
        raise ConfigError(f"{field} must be one of {', '.join(SCALE_REWARDS)} (or True/False), got {value!r}")
    return value


def check_group_size(num_generations, rows: int | None = None, *,
                     field: str = "config.grpo.num_generations") -> None:
    """ConfigError unless num_generations is an integer >= 2 (with one completion per prompt the group baseline is
    the reward itself: every advantage is 0) and, when given, divides the number of completion rows."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ConfigError(f"{field} must be an integer >= 2 (the advantage compares completions of one prompt; with "
                          f"one per prompt it is always 0), got {num_generations!r}")
    if rows is not None and rows % num_generations:
        raise ConfigError(f"{field}={num_generations} does not divide the {rows} completions of the batch")


def grouped(values: Array, num_generations: int) -> Array:
    """[B] -> [B / G, G] (checks G first)."""
    values = jnp.asarray(values, jnp.float32)
    check_group_size(num_generations, values.shape[0])
    return values.reshape(-1, num_generations)


def _std(x: Array, axis=None) -> Array:
    """Bessel-corrected standard deviation (torch.std's default, which TRL's nanstd reproduces)."""
    return jnp.std(x, axis=axis, ddof=1)


def group_advantages(rewards: Array, num_generations: int, scale_rewards: str = "group", eps: float = STD_EPS
                     ) -> Array:
    """GRPO advantages [B] from rewards [B] (see the module docstring for scale_rewards)."""
    scale_rewards = scale_rewards_mode(scale_rewards, "scale_rewards")
    groups = grouped(rewards, num_generations)
    advantages = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale_rewards == "group":
        advantages = advantages / (_std(groups, axis=1)[:, None] + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (_std(groups) + eps)
    return advantages.reshape(-1)


def leave_one_out_advantages(rewards: Array, num_generations: int) -> Array:
    """RLOO advantages [B]: r_i - (Σ_group r - r_i) / (G - 1), the mean reward of the prompt's other completions."""
    groups = grouped(rewards, num_generations)
    baselines = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (num_generations - 1)
    return (groups - baselines).reshape(-1)


def rloo_rewards(rewards: Array, old_logprobs: Array, ref_logprobs: Array | None, mask: Array, beta: float) -> Array:
    """RLOO's KL-penalised sequence reward [B]: r - β Σ_t (log π_old - log π_ref) over the actions (the k1 estimate
    summed per sequence, as TRL's RLOOTrainer and Ahmadian et al. 2024). beta == 0: r unchanged and no
    reference needed. logprobs and mask [B, T]."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if beta == 0:
        return rewards
    if ref_logprobs is None:
        raise ValueError("RLOO with beta > 0 needs the reference model's ref_logprobs")
    return rewards - beta * jnp.sum((old_logprobs - ref_logprobs) * mask, axis=1)


def normalize_advantages(advantages: Array, eps: float = STD_EPS) -> Array:
    """(A - mean) / (std + 1e-4) over the whole batch (RLOO's optional normalize_advantages in TRL; Bessel std)."""
    advantages = jnp.asarray(advantages, jnp.float32)
    return (advantages - jnp.mean(advantages)) / (_std(advantages) + eps)


def group_reward_stats(rewards: Array, num_generations: int) -> dict[str, Array]:
    """Metrics of a batch of rewards [B]: reward_mean, reward_std (over the batch), reward_group_std (mean of the
    groups' std) and zero_std_fraction (groups whose rewards are all equal: no learning signal; TRL's isclose)."""
    groups = grouped(rewards, num_generations)
    group_std = _std(groups, axis=1)
    return {"reward_mean": jnp.mean(groups), "reward_std": _std(groups), "reward_group_std": jnp.mean(group_std),
            "zero_std_fraction": jnp.mean(jnp.isclose(group_std, 0.0).astype(jnp.float32))}
