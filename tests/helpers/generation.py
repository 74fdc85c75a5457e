"""A tiny random Llama for the generation and serving tests, and its full (uncached) forward pass as the reference
that cached decoding, decode slots and the server must match."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, stack_layers

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=96,
                  dtype="float32")
NO_EOS = -7  # an id the model never produces
GEN_LEN = 10
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1, 40], [1, 3, 4, 5]]


def init_params(cfg: LlamaConfig, seed: int = 0, output_scale: float = 8.0) -> dict:
    """Random params; the output layer is scaled so that greedy argmaxes are not near-ties."""
    unrolled = cfg.replace(scan_layers=False)
    params = nn.unbox(Llama(unrolled).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    params = stack_layers(params, cfg.n_layers) if cfg.scan_layers else params
    return dict(params, output=params["output"] * output_scale)


@functools.lru_cache
def _forward(cfg: LlamaConfig):
    return jax.jit(lambda p, tokens: Llama(cfg).apply({"params": p}, tokens))


def full_logits(params, cfg, tokens) -> np.ndarray:
    return np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))
