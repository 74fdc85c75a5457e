"""Token choice, as Meta's `llama/generation.py`: greedy at temperature 0, else nucleus (top-p) sampling from
softmax(logits / temperature). Plus the checks of the sampling arguments shared by the host API and the CLIs.

Shape legend: B batch, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_TEMPERATURE = 0.6  # the defaults of Meta's text_completion / chat_completion
DEFAULT_TOP_P = 0.9


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """ValueError unless temperature >= 0 (0 means greedy)."""
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0 (0 = greedy), got {temperature}")


def check_top_p(top_p: float, name: str = "top_p") -> None:
    """ValueError unless 0 < top_p <= 1."""
    if not 0 < top_p <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {top_p}")


def check_max_gen_len(max_gen_len: int, name: str = "max_gen_len") -> None:
    """ValueError unless max_gen_len is an int >= 0."""
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {max_gen_len!r}")


def check_sampling(temperature: float, top_p: float) -> None:
    """Both checks above: temperature >= 0 and 0 < top_p <= 1."""
    check_temperature(temperature)
    check_top_p(top_p)


def sample_top_p(rng: Array, probs: Array, top_p) -> Array:
    """Meta's `sample_top_p`. probs [B, V] -> token ids [B] int32.

    Sort descending, zero every token whose cumulative mass *before* it exceeds p (`cumsum - prob > p`, so the top
    token is always kept), renormalise, draw one token."""
    order = jnp.argsort(-probs, axis=-1)  # [B, V], descending (stable: ties keep the lower id first)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    cumulative = jnp.cumsum(sorted_probs, axis=-1)
    sorted_probs = jnp.where(cumulative - sorted_probs > top_p, 0.0, sorted_probs)
    sorted_probs = sorted_probs / jnp.sum(sorted_probs, axis=-1, keepdims=True)
    choice = jax.random.categorical(rng, jnp.log(sorted_probs), axis=-1)  # [B]
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def choose_next(rng: Array, logits: Array, temperature, top_p) -> Array:
    """logits [B, V] float32 -> next token ids [B]: argmax when temperature == 0, else top-p on softmax(logits / T).
    temperature and top_p are scalars (may be traced)."""

    def sampled():
        return sample_top_p(rng, jax.nn.softmax(logits / temperature, axis=-1), top_p)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, sampled, greedy)
