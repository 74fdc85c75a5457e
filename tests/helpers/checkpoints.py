"""A tiny model config and random float32 params with its tree, for checkpoint tests."""

import jax
import numpy as np

from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import abstract_params

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64,
                  dtype="float32")


def init_np(cfg: LlamaConfig, seed: int = 0):
    """Random float32 params with the model's tree and shapes (numpy: no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), abstract_params(cfg))
