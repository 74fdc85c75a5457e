"""int8 weight-only quantization for serving (--quantize=int8): every matmul kernel of the model (attention wq, wk, wv,
wo; feed-forward w1, w2, w3; the output layer) is stored as int8 with one float32 scale per output channel,
scale = max |w| over the contracted axes / 127 (symmetric, round to nearest). Embeddings and norms stay as they are
(the embedding is a gather, not a matmul: its int8 form would be dequantized whole at every step).

Why our own few lines and not qwix: decode steps are memory-bound, so what matters is that the weights rest in HBM
as int8 and are widened per layer next to their matmul. That needs nothing but the kernels' contracted axes, which
the model's parameter names give; qwix's PTQ would wrap the model's Flax module (its dot_general interception) and
add a dependency to the serve extra for the same arithmetic. The dequantization is emitted layer by layer inside
the compiled step (`Dequantized` hands the decode code each layer's weights when it asks for them), so XLA fuses the
int8 -> compute-dtype widening into the matmul's operand where it can and never holds a second full copy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# parameter name -> the axes its matmul contracts (model/llama.py: wq [D, N, H], wo [N, H, D], w1 [D, F], ...)
CONTRACTED = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w1": (0,), "w2": (0,), "w3": (0,), "output": (0,)}
QUANTIZED = ("int8", "scale")


@functools.partial(jax.jit, static_argnums=1)
def quantize_kernel(kernel, axes: tuple[int, ...]) -> dict[str, Any]:
    """{"int8": round(w / scale) in [-127, 127], "scale": max |w| over `axes` / 127 (kept dims, float32)}, computed
    where the kernel lives (a 7B model quantizes on its accelerator in seconds)."""
    w = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
    return {"int8": jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), "scale": scale}


def quantize_params(params: dict) -> dict:
    """Unstacked layer params (decode.layer_params) with every kernel named in CONTRACTED quantized."""
    def walk(tree, name=None):
        if isinstance(tree, Mapping):
            return {key: walk(value, key) for key, value in tree.items()}
        return quantize_kernel(tree, CONTRACTED[name]) if name in CONTRACTED else tree

    return walk(params)


def is_quantized(value) -> bool:
    return isinstance(value, Mapping) and set(value) == set(QUANTIZED)


def dequantize(tree, dtype):
    """A subtree with every quantized kernel widened to `dtype` (int8 * scale)."""
    if is_quantized(tree):
        return (tree["int8"].astype(jnp.float32) * tree["scale"]).astype(dtype)
    if isinstance(tree, Mapping):
        return {key: dequantize(value, dtype) for key, value in tree.items()}
    return tree


class Dequantized(Mapping):
    """A read-only view of quantized params that widens an entry when it is looked up: inside a traced decode step
    each layer's weights are dequantized where the layer runs (decode.decode_forward indexes params layer by
    layer)."""

    def __init__(self, params: Mapping, dtype):
        self._params, self._dtype = params, dtype

    def __getitem__(self, key):
        return dequantize(self._params[key], self._dtype)

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def weights_view(params, cfg):
    """What the decode code should index: `Dequantized` for quantized params, the params themselves otherwise."""
    quantized = any(is_quantized(v) for v in jax.tree_util.tree_leaves(params, is_leaf=is_quantized))
    return Dequantized(params, jnp.dtype(cfg.dtype)) if quantized else params
