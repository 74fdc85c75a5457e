"""The reward model (paper Section 3.2.2): the Llama trunk with the output head replaced by a scalar regression head.

    RewardModel(cfg).apply({"params": params}, tokens [B, T], lengths [B]) -> raw scores [B] float32

Parameter tree: the Llama trunk's names (tok_embeddings, layers_{i} or layers, norm; see model.py), without `output`,
plus `score_head/kernel [D, 1]`. A Llama checkpoint therefore loads into the trunk unchanged
(`init_reward_params_from_llama`).

Choices the paper leaves open, made here:
* **Which token feeds the head.** Sequences are right-padded; the score is read from the final hidden state of the
  **last real token**, `tokens[b, lengths[b] - 1]`. For a pair encoded in Meta's chat format (BOS [INST] ... [/INST]
  answer "▁" EOS) that is the EOS that ends the assistant answer: the one position that has seen the whole prompt and
  the whole response. Attention is causal, so right padding can never change that hidden state (scores are
  invariant to padding, up to float rounding of different matmul shapes).
* **Head.** A kernel [D, 1], no bias, initialised N(0, head_init_std = 1e-3): initial raw scores are ~0 (sigmoid
  ~0.5, loss ~log 2) so the first steps do not fight a random ranking. There is no bias because the pairwise loss only
  sees r_chosen - r_rejected: a bias would never get a gradient (HF's LlamaForSequenceClassification has none either).
  The head runs in float32 on the final-norm hidden state.
* **Scores for rejection sampling and PPO** are sigmoid(raw score) in [0, 1] (the paper's thresholds 0.5 and 0.15,
  Section 3.2.3 and Appendix A.3.4, are on that scale). `score_tokens` (raw, pure, jit-able) and `score` (host-side:
  dialogs -> sorted, bucketed, padded batches -> sigmoid scores in input order).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama2_jax import chat
from llama2_jax import checkpoint as param_checkpoint
from llama2_jax import sharding as sh
from llama2_jax.config import LlamaConfig
from llama2_jax.losses import RATINGS, margin_for, ranking_loss
from llama2_jax.model import default_positions, run_trunk, stack_layers, unstack_layers

Array = jax.Array
HEAD = "score_head"
DEFAULT_HEAD_INIT_STD = 1e-3
PAD_ID = 0  # right padding; never attended to by real tokens (causal), so any id works


class RewardModel(nn.Module):
    """Llama trunk + scalar head read at the last real token. See the module docstring."""

    config: LlamaConfig
    head_init_std: float = DEFAULT_HEAD_INIT_STD

    @nn.compact
    def __call__(self, tokens: Array, lengths: Array, positions: Optional[Array] = None,
                 segment_ids: Optional[Array] = None) -> Array:
        """tokens [B, T] int, right-padded; lengths [B] int (real tokens per row, >= 1; 0 reads token 0);
        positions/segment_ids [B, T] optional as in `Llama`. Returns raw scores [B] float32."""
        cfg = self.config
        if positions is None:
            positions = default_positions(tokens)
        hidden = run_trunk(cfg, tokens, positions, segment_ids)  # [B, T, D]
        last = jnp.clip(lengths.astype(jnp.int32) - 1, 0, tokens.shape[1] - 1)
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0, :]  # [B, D]
        return ScoreHead(cfg, self.head_init_std, name=HEAD)(final)


class ScoreHead(nn.Module):
    """h [B, D] -> h @ kernel [D, 1] in float32 -> [B]. No bias (see the module docstring)."""

    config: LlamaConfig
    init_std: float

    @nn.compact
    def __call__(self, h: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (sh.EMBED, None))
        kernel = self.param("kernel", init, (self.config.dim, 1), jnp.dtype(self.config.param_dtype))
        return jnp.einsum("BD,DO->BO", h.astype(jnp.float32), kernel.astype(jnp.float32))[:, 0]


def _head_kernel(rng: Array, dim: int, std: float, dtype) -> np.ndarray:
    return np.asarray(jax.random.normal(rng, (dim, 1), jnp.float32) * std, dtype=dtype)


def init_reward_params_from_llama(llama_params: dict, rng: Array,
                                  head_init_std: float = DEFAULT_HEAD_INIT_STD) -> dict:
    """Llama params (unrolled or scanned, unboxed) -> reward-model params: `output` dropped, a fresh
    `score_head/kernel [D, 1]` ~ N(0, head_init_std) added in the embedding's dtype. The trunk arrays are reused
    as they are (no copy, shardings kept); the small head is a host array (jit places it)."""
    params = {k: v for k, v in llama_params.items() if k != "output"}
    embedding = params["tok_embeddings"]["embedding"]
    params[HEAD] = {"kernel": _head_kernel(rng, embedding.shape[1], head_init_std, embedding.dtype)}
    return params


def abstract_reward_params(cfg: LlamaConfig, boxed: bool = False) -> Any:
    """Reward-model parameter shapes without allocating (`jax.eval_shape`); `boxed` keeps logical-axis boxes."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(RewardModel(cfg).init, jax.random.PRNGKey(0), tokens, lengths)["params"]
    return shapes if boxed else nn.unbox(shapes)


def load_reward_params(path, config: Optional[LlamaConfig] = None) -> tuple[dict, LlamaConfig]:
    """Params of a reward-model trainer workdir (latest checkpoint) as host numpy arrays, in the layout
    `config.scan_layers` asks for (default: the stored `llama_config.json`). Returns (params, config)."""
    config = config or param_checkpoint.load_config(path)
    item_dir = param_checkpoint.find_params_dir(path)
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(item_dir)
        metadata = getattr(metadata, "item_metadata", metadata)  # StepMetadata (new Orbax) or the tree (old)
        metadata = dict(getattr(metadata, "tree", metadata))
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        params = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    if HEAD not in params:
        raise ValueError(f"{item_dir} has no '{HEAD}': not a reward-model checkpoint (a Llama checkpoint loads with "
                         "init_reward_params_from_llama)")
    scanned = "layers" in params
    if scanned and not config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    elif config.scan_layers and not scanned:
        params = stack_layers(params, config.n_layers)
    params = jax.tree.map(np.asarray, params)
    expected = jax.tree.map(lambda x: x.shape, abstract_reward_params(config))
    if jax.tree.map(np.shape, params) != expected:
        raise ValueError(f"{item_dir}: parameter shapes do not match the reward model of {config}")
    return params, config


# ----------------------------------------------------------------------------------------------------------- scoring


def score_tokens(params, cfg: LlamaConfig, tokens: Array, lengths: Array) -> Array:
    """Raw scores [B] float32 of right-padded tokens [B, T] with `lengths` [B]. Pure: use inside jit (cfg static)."""
    return RewardModel(cfg).apply({"params": params}, tokens, lengths)


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
    from llama2_jax.data import rm  # pylint: disable=g-import-not-at-top (rm imports nothing from here)

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


# -------------------------------------------------------------------------------------------------------------- loss

RATING_LEVELS = RATINGS + ("unrated",)  # per-level metrics; "unrated" = rating index -1 (HH, OASST: every pair)


def pair_scores(params, batch: dict, model: RewardModel) -> tuple[Array, Array]:
    """(r_chosen [P], r_rejected [P]): one forward pass over the 2P sequences of a pair batch (see data/rm.py)."""
    tokens = batch["tokens"]
    n_pairs, _, length = tokens.shape
    scores = model.apply({"params": params}, tokens.reshape(2 * n_pairs, length),
                         batch["lengths"].reshape(2 * n_pairs))
    scores = scores.reshape(n_pairs, 2)
    return scores[:, 0], scores[:, 1]


def pairwise_loss(params, batch: dict, *, model: RewardModel, margin_table: str = "none") -> tuple[Array, dict]:
    """Binary ranking loss with margin, -log sigma(r_c - r_r - m(rating)) (paper Eq. 2), with the loss contract of
    `llama2_jax.losses`: (sum over pairs, aux of sums), aux["weight"] = number of real pairs.

    batch: tokens [P, 2, T], lengths [P, 2], rating [P] (-1 = none: margin 0), optional valid [P] (0 = padding pair).
    aux (all sums over pairs): "accuracy" (r_c > r_r; a tie counts as wrong), "margin" (r_c - r_r),
    "score_chosen"/"score_rejected" (raw scores), and per rating level L in RATING_LEVELS "n_L" (pairs at that level)
    and "correct_L" (of those, ranked right). The loop divides every entry by the total weight, so per-level accuracy
    is correct_L / n_L of the same record (`per_rating_accuracy`).
    """
    r_chosen, r_rejected = pair_scores(params, batch, model)
    rating = batch["rating"].astype(jnp.int32)
    valid = batch.get("valid", jnp.ones_like(r_chosen)).astype(jnp.float32)
    per_pair = ranking_loss(r_chosen, r_rejected, margin_for(rating, margin_table)) * valid
    correct = (r_chosen > r_rejected).astype(jnp.float32) * valid
    aux = {"weight": jnp.sum(valid), "accuracy": jnp.sum(correct), "margin": jnp.sum((r_chosen - r_rejected) * valid),
           "score_chosen": jnp.sum(r_chosen * valid), "score_rejected": jnp.sum(r_rejected * valid)}
    for index, level in enumerate(RATING_LEVELS):
        in_level = (rating == (index if index < len(RATINGS) else -1)).astype(jnp.float32) * valid
        aux[f"n_{level}"] = jnp.sum(in_level)
        aux[f"correct_{level}"] = jnp.sum(correct * in_level)
    return jnp.sum(per_pair), aux


def per_rating_accuracy(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """{f"{prefix}accuracy_{L}": correct_L / n_L} for the levels present in a metrics record (sums or means over
    the same weight). Levels with no pairs are left out."""
    out = {}
    for level in RATING_LEVELS:
        n = metrics.get(f"{prefix}n_{level}", 0.0)
        if n > 0:
            out[f"{prefix}accuracy_{level}"] = metrics[f"{prefix}correct_{level}"] / n
    return out
