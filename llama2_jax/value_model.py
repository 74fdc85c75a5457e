"""The PPO value model (critic): the reward model's architecture read at *every* token, not only the last.

    ValueModel(cfg).apply({"params": params}, tokens [B, T]) -> values [B, T] float32

`values[:, t]` is V(tokens[:, :t + 1]): the head on the final-norm hidden state at t, which has seen tokens 0..t.

The parameter tree is exactly `reward_model.RewardModel`'s (the Llama trunk's names plus `score_head/kernel [D, 1]`),
so a reward-model checkpoint is a value model as it stands. The paper does not describe its critic;
InstructGPT initialises the value function from the reward model, and that is the default in
`train.ppo` (`config.value.init_from = "helpful_rm"`). "policy" takes the policy's trunk and a fresh head
(`init_value_params_from_llama`), as TRL's shared-trunk value head does at the start of training.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama2_jax.config import LlamaConfig
from llama2_jax.model import default_positions, run_trunk
from llama2_jax.reward_model import DEFAULT_HEAD_INIT_STD, HEAD, ScoreHead, init_reward_params_from_llama

Array = jax.Array


class ValueModel(nn.Module):
    """Llama trunk + scalar head at every position (parameter names shared with RewardModel)."""

    config: LlamaConfig
    head_init_std: float = DEFAULT_HEAD_INIT_STD

    @nn.compact
    def __call__(self, tokens: Array, positions: Optional[Array] = None,
                 segment_ids: Optional[Array] = None) -> Array:
        """tokens [B, T] int (valid ids); positions/segment_ids [B, T] optional as in `Llama`. Returns [B, T]."""
        cfg = self.config
        if positions is None:
            positions = default_positions(tokens)
        hidden = run_trunk(cfg, tokens, positions, segment_ids)  # [B, T, D]
        batch, length, dim = hidden.shape
        values = ScoreHead(cfg, self.head_init_std, name=HEAD)(hidden.reshape(batch * length, dim))
        return values.reshape(batch, length)


def token_values(params, cfg: LlamaConfig, tokens: Array) -> Array:
    """Values [B, T] float32 of tokens [B, T]. Pure: use inside jit (cfg static)."""
    return ValueModel(cfg).apply({"params": params}, tokens)


def init_value_params_from_llama(llama_params: dict, rng: Array,
                                 head_init_std: float = DEFAULT_HEAD_INIT_STD) -> dict:
    """Llama (policy) params -> value params: the trunk shared as it is, `output` dropped, a fresh head."""
    return init_reward_params_from_llama(llama_params, rng, head_init_std)


def abstract_value_params(cfg: LlamaConfig, boxed: bool = False):
    """Value-model parameter shapes without allocating; `boxed` keeps the logical-axis boxes (for shardings)."""
    shapes = jax.eval_shape(ValueModel(cfg).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    return shapes["params"] if boxed else nn.unbox(shapes["params"])
