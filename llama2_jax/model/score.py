"""The score-head model: a Llama trunk whose next-token head is replaced by a scalar head. It is the reward model
(paper section 3.2.2: the next-token classification head is replaced by a regression head that outputs a scalar) when
read at the last real token, and PPO's value model when read at every position.

    ScoreModel(cfg).apply({"params": p}, tokens [B, T], lengths [B]) -> raw scores [B] float32 (reward)
    ScoreModel(cfg).apply({"params": p}, tokens [B, T])              -> values [B, T] float32 (value: values[:, t]
                                                                        is the head on the hidden state at t, which
                                                                        has seen tokens 0..t)

Parameter tree: the Llama trunk's names (tok_embeddings, layers_{i} or layers, norm; see model.py), without `output`,
plus `score_head/kernel [D, 1]`. A Llama checkpoint therefore loads into the trunk unchanged
(`init_score_params_from_llama`), and a reward-model checkpoint is a value model as it stands. Score-model
checkpoints load with `checkpoint.load_params(path, cfg, kind="score")`.

Choices the paper leaves open, made here:
* **Which token feeds the head.** Sequences are right-padded; the reward is read from the final hidden state of the
  **last real token**, `tokens[b, lengths[b] - 1]`. For a pair encoded in Meta's chat format (BOS [INST] ... [/INST]
  answer "▁" EOS) that is the EOS that ends the assistant answer: the one position that has seen the whole prompt and
  the whole response. Attention is causal, so right padding can never change that hidden state.
* **Head.** A kernel [D, 1], no bias, initialised N(0, head_init_std = 1e-3): initial raw scores are ~0 (sigmoid
  ~0.5, loss ~log 2) so the first steps do not fight a random ranking. There is no bias because the pairwise loss only
  sees r_chosen - r_rejected: a bias would never get a gradient (HF's LlamaForSequenceClassification has none either).
  The head runs in float32 on the final-norm hidden state.
* **The critic.** The paper does not describe PPO's value model; InstructGPT initialises it from the reward model,
  the default of `train.ppo`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import default_positions, run_trunk

Array = jax.Array
HEAD = "score_head"
DEFAULT_HEAD_INIT_STD = 1e-3


class ScoreHead(nn.Module):
    """h [N, D] -> h @ kernel [D, 1] in float32 -> [N]. No bias (see the module docstring)."""
    config: LlamaConfig
    init_std: float

    @nn.compact
    def __call__(self, h: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (sh.EMBED, None))
        kernel = self.param("kernel", init, (self.config.dim, 1), jnp.dtype(self.config.param_dtype))
        return jnp.einsum("ND,DO->NO", h.astype(jnp.float32), kernel.astype(jnp.float32))[:, 0]


class ScoreModel(nn.Module):
    """Llama trunk + scalar head, read at the last real token (`lengths` given) or at every position."""
    config: LlamaConfig
    head_init_std: float = DEFAULT_HEAD_INIT_STD

    @nn.compact
    def __call__(self, tokens: Array, lengths: Optional[Array] = None, positions: Optional[Array] = None,
                 segment_ids: Optional[Array] = None) -> Array:
        """tokens [B, T] int, right-padded; lengths [B] int (real tokens per row, >= 1; 0 reads token 0) or None;
        positions/segment_ids [B, T] optional as in `Llama`. Returns raw scores [B] (lengths given) or values
        [B, T] (lengths None), float32."""
        cfg = self.config
        if positions is None:
            positions = default_positions(tokens)
        hidden = run_trunk(cfg, tokens, positions, segment_ids)  # [B, T, D]
        head = ScoreHead(cfg, self.head_init_std, name=HEAD)
        if lengths is None:
            batch, length, dim = hidden.shape
            return head(hidden.reshape(batch * length, dim)).reshape(batch, length)
        last = jnp.clip(lengths.astype(jnp.int32) - 1, 0, tokens.shape[1] - 1)
        return head(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0, :])  # [B, D] -> [B]


def score_tokens(params, cfg: LlamaConfig, tokens: Array, lengths: Array) -> Array:
    """Raw rewards [B] float32 of right-padded tokens [B, T] with `lengths` [B]. Pure: use inside jit (cfg static)."""
    return ScoreModel(cfg).apply({"params": params}, tokens, lengths)


def token_values(params, cfg: LlamaConfig, tokens: Array) -> Array:
    """Values [B, T] float32 of tokens [B, T]. Pure: use inside jit (cfg static)."""
    return ScoreModel(cfg).apply({"params": params}, tokens)


def init_score_params_from_llama(llama_params: dict, rng: Array, head_init_std: float = DEFAULT_HEAD_INIT_STD) -> dict:
    """Llama params (unrolled or scanned, unboxed) -> score-model params: `output` dropped, a fresh
    `score_head/kernel [D, 1]` ~ N(0, head_init_std) added in the embedding's dtype. The trunk arrays are reused
    as they are (no copy, shardings kept); the small head is a host array (jit places it)."""
    params = {k: v for k, v in llama_params.items() if k != "output"}
    embedding = params["tok_embeddings"]["embedding"]
    kernel = jax.random.normal(rng, (embedding.shape[1], 1), jnp.float32) * head_init_std
    params[HEAD] = {"kernel": np.asarray(kernel, dtype=embedding.dtype)}
    return params


def abstract_score_params(cfg: LlamaConfig, boxed: bool = False) -> Any:
    """Score-model parameter shapes without allocating (`jax.eval_shape`); `boxed` keeps logical-axis boxes."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(ScoreModel(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
    return shapes if boxed else nn.unbox(shapes)
