"""Scoring with a reward model on the host: dialogs or token lists -> sorted, bucketed, padded batches -> sigmoid
scores in [0, 1], in input order.

The model is `score_model.ScoreModel` read at the last real token; a `train.reward` workdir loads with
`checkpoint.load_params(workdir, kind="score")`. Scores are sigmoid(raw score): the paper's thresholds (0.15 for the
safety score in the piecewise reward of section 3.2.3) are on that scale.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import numpy as np

from llama2_jax.data import rm
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.score import score_tokens
from llama2_jax.text import chat_format as chat

Array = jax.Array
PAD_ID = 0  # right padding; never attended to by real tokens (causal), so any id works


@functools.partial(jax.jit, static_argnums=(1,))
def _sigmoid_scores(params, cfg: LlamaConfig, tokens: Array, lengths: Array) -> Array:
    return jax.nn.sigmoid(score_tokens(params, cfg, tokens, lengths))


def bucket_length(length: int, max_len: int, min_bucket: int = 16) -> int:
    """The smallest power of two >= length (at least `min_bucket`), capped at `max_len`: few compiled shapes."""
    return min(max_len, max(min_bucket, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


def encode_scored(tokenizer, item, max_len: int) -> list[int]:
    """Token ids of one item to score: a dialog ending with the assistant response (prompt messages + {"role":
    "assistant", ...}) in Meta's chat format, truncated like the RM training data; or a token list, of which at most
    the last max_len tokens are kept (the end of the response, where the score is read)."""

    if len(item) and isinstance(item[0], dict):
        if tokenizer is None:
            raise ValueError("scoring dialogs needs a tokenizer")
        prompt, response = rm.split_prompt_response(tokenizer, item)
        return rm.truncate_pair(prompt, [response], max_len, bos_id=tokenizer.bos_id)[0][0]
    tokens = [int(t) for t in item]
    if not tokens:
        raise ValueError("cannot score an empty token sequence")
    return tokens[-max_len:]


def score(params, cfg: LlamaConfig, items: Sequence, tokenizer=None, *, batch_size: int = 8,
          max_len: Optional[int] = None, mesh=None) -> np.ndarray:
    """Sigmoid reward scores in [0, 1], float32 [len(items)], in input order.

    Args:
      params: reward-model params (host or sharded arrays).
      cfg: the model's LlamaConfig.
      items: dialogs (each a list of messages ending with the assistant response to score) and/or token-id lists.
      tokenizer: needed for dialogs.
      batch_size: rows per forward pass (rounded up to the mesh's data-parallel size); every batch has this many rows.
      max_len: truncation length (default cfg.max_seq_len); prompts lose tokens on the left, responses on the right.
      mesh: when given, batches are split over its data axes (params should already be sharded on it).
    """
    max_len = max_len or cfg.max_seq_len
    if mesh is not None:
        dp = sh.data_parallel_size(mesh)
        batch_size = -(-batch_size // dp) * dp
    encoded = [encode_scored(tokenizer, item, max_len) for item in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a bucket
    out = np.zeros(len(encoded), np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = bucket_length(max(len(encoded[i]) for i in chunk), max_len)
        tokens = np.full((batch_size, width), PAD_ID, np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for row, i in enumerate(chunk):
            tokens[row, :len(encoded[i])] = encoded[i]
            lengths[row] = len(encoded[i])
        if mesh is not None:
            tokens = jax.device_put(tokens, sh.batch_sharding(mesh, 2))
            lengths = jax.device_put(lengths, sh.batch_sharding(mesh, 1))
        out[chunk] = np.asarray(_sigmoid_scores(params, cfg, tokens, lengths))[:len(chunk)]
    return out


def dialog_for_scoring(prompt: Sequence[dict], response: str) -> list[dict]:
    """prompt messages (ending with a user turn) + the assistant response, checked."""
    dialog = list(prompt) + [{"role": "assistant", "content": response}]
    chat.normalize_dialog(dialog, last_role="assistant")
    return dialog
