"""LoRA (Hu et al. 2021): low-rank adapters on the frozen kernels of a Llama (or reward model) trunk.

A target kernel W [*in, *out] gets two trainable factors, a [*in, r] and b [r, *out]; the adapted projection is

    y = x W + (alpha / r) * (dropout(x) a) b

with `a` drawn as PEFT draws lora_A (uniform in ±1/sqrt(fan_in)) and `b` zero, so a fresh adapter leaves the model
exactly as it was. The adapters are a tree of their own, laid out like the params and handed to the model as the
"lora" variable collection (model.adapted_project): `{"layers_0": {"attention": {"wq": {"a": .., "b": ..}}}}`, or
with `scan_layers=True` one stacked `{"layers": ...}` entry whose leaves carry a leading [L] axis. The base params
are never touched: they stay in their own dtype (e.g. bfloat16) and receive no gradient.

Shapes (D model dim, N/K query/KV heads, H head dim, F FFN width, r rank):
  wq a [D, r] b [r, N, H];  wk, wv a [D, r] b [r, K, H];  wo a [N, H, r] b [r, D]
  w1, w3 a [D, r] b [r, F];  w2 a [F, r] b [r, D]
Logical axes: a's input axes and b's output axes are the kernel's own (model.py), the rank axis is None
(replicated), so the adapters shard like their kernels under sharding.LOGICAL_RULES.

A trainer needs: `adapters = init(rng, base, cfg, lora_cfg)`, a loss `adapted_loss(loss_fn, model, lora_cfg)` that
takes (trainable, batch, frozen, rng) (trainable = {"lora": adapters} plus any top-level base entries it also
trains, e.g. a reward model's score head), and checkpoint.save_adapters / load_adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig, check_known_fields
from llama2_jax.model.llama import LORA, LORA_DROPOUT_RNG, abstract_params

Array = jax.Array
Params = dict

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
MLP_TARGETS = ("w1", "w2", "w3")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
_MODULE_OF = {**{name: "attention" for name in ATTENTION_TARGETS}, **{name: "feed_forward" for name in MLP_TARGETS}}
_N_IN = {"wo": 2}  # kernels with more than one input axis (wo [N, H, D] contracts heads and head dim)
SCANNED_KEY = "layers"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r (> 0), alpha (the update is scaled by alpha / r), dropout on the adapters' input while training, and
    the target kernels (any of wq, wk, wv, wo, w1, w2, w3; default all: the attention and MLP kernels)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    dtype: str = "float32"  # storage dtype of the adapters (and of their optimizer state)

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoraConfig.targets must be distinct names among {', '.join(ALL_TARGETS)}, "
                             f"got {self.targets!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"LoraConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["targets"] = list(self.targets)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoraConfig":
        check_known_fields(cls, values)
        return cls(**{**values, "targets": tuple(values.get("targets", ALL_TARGETS))})


# ------------------------------------------------------------------------------------------------ shapes and axes


def _block_keys(params: Params) -> list[str]:
    """The keys of the transformer blocks in a param tree: ["layers"] (scanned) or ["layers_0", …] (unrolled)."""
    if SCANNED_KEY in params:
        return [SCANNED_KEY]
    keys = sorted((k for k in params if k.startswith("layers_") and k[len("layers_"):].isdigit()),
                  key=lambda k: int(k[len("layers_"):]))
    if not keys:
        raise ValueError("no transformer blocks (layers / layers_<i>) in the param tree given to lora")
    return keys


def _kernel_axes(cfg: LlamaConfig) -> dict[str, tuple]:
    """{target: the kernel's logical axes} as model.py declares them (one unrolled block, shapes only)."""
    boxed = abstract_params(cfg.replace(n_layers=1, scan_layers=False), boxed=True)["layers_0"]
    return {name: tuple(boxed[_MODULE_OF[name]][name].names) for name in ALL_TARGETS}


def adapter_specs(base: Params, cfg: LlamaConfig, lora_cfg: LoraConfig) -> dict:
    """{block key: {module: {target: {"a": (shape, axes), "b": (shape, axes)}}}} for the base's layout."""
    kernel_axes = _kernel_axes(cfg)
    specs = {}
    for key in _block_keys(base):
        lead = (sh.LAYERS,) if key == SCANNED_KEY else ()
        block = {}
        for name in lora_cfg.targets:
            module = _MODULE_OF[name]
            shape = tuple(np.shape(base[key][module][name]))
            n_lead, n_in = len(lead), _N_IN.get(name, 1)
            axes = kernel_axes[name]
            in_shape, out_shape = shape[n_lead:n_lead + n_in], shape[n_lead + n_in:]
            block.setdefault(module, {})[name] = {
                "a": (shape[:n_lead] + in_shape + (lora_cfg.rank,), lead + axes[:n_in] + (None,)),
                "b": (shape[:n_lead] + (lora_cfg.rank,) + out_shape, lead + (None,) + axes[n_in:]),
            }
        specs[key] = block
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def abstract(base: Params, cfg: LlamaConfig, lora_cfg: LoraConfig, boxed: bool = False) -> Params:
    """The adapters' ShapeDtypeStructs (in `nn.LogicallyPartitioned` boxes with `boxed`, for
    sharding.tree_shardings / llama2_jax.training.state.state_shardings); `base` may itself be abstract."""
    dtype = jnp.dtype(lora_cfg.dtype)

    def leaf(spec):
        struct = jax.ShapeDtypeStruct(spec[0], dtype)
        return nn.LogicallyPartitioned(struct, spec[1]) if boxed else struct

    return jax.tree.map(leaf, adapter_specs(base, cfg, lora_cfg), is_leaf=_is_spec)


# ------------------------------------------------------------------------------------------------------- init


def init(rng: Array, base: Params, cfg: LlamaConfig, lora_cfg: LoraConfig) -> Params:
    """Fresh adapters for `base` (unrolled or scanned; a Llama or a reward model's params; only its shapes are
    read): a ~ U(±1/sqrt(fan_in)) as PEFT's lora_A, b = 0. One jitted program; call it inside a jit with
    out_shardings from `abstract(..., boxed=True)` to create the adapters sharded."""
    specs = adapter_specs(base, cfg, lora_cfg)
    return jax.jit(functools.partial(_init_from_specs, specs, jnp.dtype(lora_cfg.dtype)))(rng)


def _init_from_specs(specs: dict, dtype, rng: Array) -> Params:
    adapters = {}
    for key, block in specs.items():
        n_lead = 1 if key == SCANNED_KEY else 0
        for module, kernels in block.items():
            for name, spec in kernels.items():
                rng, sub = jax.random.split(rng)
                a_shape, b_shape = spec["a"][0], spec["b"][0]
                bound = 1.0 / math.sqrt(math.prod(a_shape[n_lead:-1]))  # fan_in: the kernel's input size
                adapters.setdefault(key, {}).setdefault(module, {})[name] = {
                    "a": jax.random.uniform(sub, a_shape, dtype, -bound, bound), "b": jnp.zeros(b_shape, dtype)}
    return adapters


# ------------------------------------------------------------------------------------------------ the forward


def scaled(adapters: Params, lora_cfg: LoraConfig) -> Params:
    """b multiplied by alpha / r, as model.adapted_project expects (cheap: the adapters are small)."""
    return _map_b(adapters, lambda b: b * jnp.asarray(lora_cfg.scale, b.dtype))


def _map_b(adapters: Params, fn) -> Params:
    out = {}
    for key, value in adapters.items():
        if key == "b" and not isinstance(value, dict):
            out[key] = fn(value)
        else:
            out[key] = _map_b(value, fn) if isinstance(value, dict) else value
    return out


def variables(frozen: Params, trainable: Params, lora_cfg: LoraConfig) -> dict:
    """Flax variables for `model.apply`: {"params": frozen base with trainable's non-"lora" top-level entries
    swapped in (e.g. a score head), "lora": scaled adapters}."""
    extra = {k: v for k, v in trainable.items() if k != LORA}
    missing = sorted(set(extra) - set(frozen))
    if missing:
        raise ValueError(f"trainable entries {missing} replace nothing in the frozen base params")
    return {"params": {**frozen, **extra}, LORA: scaled(trainable[LORA], lora_cfg)}


def apply(model: nn.Module, frozen: Params, trainable: Params, lora_cfg: LoraConfig, *args,
          rng: Optional[Array] = None, **kwargs):
    """`model.apply` with adapters: trainable = {"lora": adapters, ...}. With `rng`, dropout (rate
    `lora_cfg.dropout`) on the adapters' input, as in training; without, deterministic."""
    rngs = None if rng is None else {LORA_DROPOUT_RNG: rng}
    return adapted_model(model, lora_cfg).apply(variables(frozen, trainable, lora_cfg), *args, rngs=rngs, **kwargs)


def adapted_model(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """The same model with `config.lora_dropout` (read by model.adapted_project) set from the LoRA config."""
    if model.config.lora_dropout == lora_cfg.dropout:
        return model
    return model.clone(config=model.config.replace(lora_dropout=lora_cfg.dropout))


class _AdaptedApply:
    """Stands in for the model inside a losses.py loss: `.apply({"params": trainable}, ...)` runs the adapted model
    when the tree holds "lora"; a tree without it (e.g. DPO's reference: the frozen base itself) runs as plain
    params, adapters off."""

    def __init__(self, model, frozen, lora_cfg, rng):
        self.model, self.frozen, self.lora_cfg, self.rng = model, frozen, lora_cfg, rng
        self.config = model.config

    def apply(self, variables_: dict, *args, **kwargs):
        if LORA not in variables_["params"]:
            return self.model.apply(variables_, *args, **kwargs)
        return apply(self.model, self.frozen, variables_["params"], self.lora_cfg, *args, rng=self.rng, **kwargs)


def adapted_loss(loss_fn: Callable, model: nn.Module, lora_cfg: LoraConfig, *, pass_frozen: bool = False) -> Callable:
    """A losses.py loss `loss_fn(params, batch, *, model)` -> `fn(trainable, batch, frozen, rng=None)`.

    Differentiate `fn` w.r.t. `trainable` only ({"lora": adapters} plus any trained top-level base entries); the
    frozen base is an ordinary (non-differentiated) argument, so jit it as an argument, never close over it. With
    `pass_frozen` the loss is `loss_fn(params, batch, frozen, *, model)` (losses.dpo_loss: the base, adapters off,
    is then the reference policy)."""
    def fn(trainable: Params, batch: dict, frozen: Params, rng: Optional[Array] = None):
        adapted = _AdaptedApply(model, frozen, lora_cfg, rng)
        if pass_frozen:
            return loss_fn(trainable, batch, frozen, model=adapted)
        return loss_fn(trainable, batch, model=adapted)

    return fn


# ------------------------------------------------------------------------------------------------------ merge


def _walk_adapters(adapters: Params):
    """(block key, module, target, {"a", "b"}) for every adapter."""
    for key, block in adapters.items():
        for module, kernels in block.items():
            for name, pair in kernels.items():
                yield key, module, name, pair


def delta(pair: dict, kernel_shape: tuple, n_lead: int, scale: float) -> Array:
    """scale * a b reshaped to the kernel, in float32. a [lead, *in, r], b [lead, r, *out]."""
    a, b = jnp.asarray(pair["a"], jnp.float32), jnp.asarray(pair["b"], jnp.float32)
    lead, rank = a.shape[:n_lead], a.shape[-1]
    a2 = a.reshape(lead + (-1, rank))
    b2 = b.reshape(lead + (rank, -1))
    return (scale * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)).reshape(kernel_shape)


def merge(base: Params, adapters: Params, lora_cfg: LoraConfig) -> Params:
    """Base params with every adapted kernel replaced by W + (alpha / r) a b, computed in float32 and stored in the
    kernel's dtype (numpy kernels stay numpy, one kernel on the device at a time). Both trees must share a layout
    (see `to_layout`). Returns a new tree; `base` is not modified. Jit it (donating base) for sharded params."""
    merged = jax.tree.map(lambda x: x, base)
    for key, module, name, pair in _walk_adapters(adapters):
        if key not in base or name not in base[key].get(module, {}):
            raise ValueError(f"adapter {key}/{module}/{name} has no kernel in the base params (layout differs?)")
        kernel = base[key][module][name]
        n_lead = 1 if key == SCANNED_KEY else 0
        new = (jnp.asarray(kernel, jnp.float32) + delta(pair, np.shape(kernel), n_lead, lora_cfg.scale))
        new = new.astype(kernel.dtype)
        merged[key][module][name] = np.asarray(new) if isinstance(kernel, np.ndarray) else new  # host stays host
    return merged


def to_layout(adapters: Params, n_layers: int, scanned: bool) -> Params:
    """Adapters in the scanned (`layers` [L, ...]) or unrolled (`layers_{i}`) layout."""
    is_scanned = SCANNED_KEY in adapters
    if is_scanned == scanned:
        return adapters
    if scanned:
        layers = [adapters[f"layers_{i}"] for i in range(n_layers)]
        return {SCANNED_KEY: jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {f"layers_{i}": jax.tree.map(lambda x: x[i], adapters[SCANNED_KEY]) for i in range(n_layers)}


# --------------------------------------------------------------------------------------------------- counting


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def describe(trainable: Any, frozen: Any) -> str:
    """The line a LoRA run prints at its start: trainable and total parameter counts."""
    n_train, n_frozen = count(trainable), count(frozen)
    total = n_train + n_frozen
    return (f"LoRA: trainable parameters {n_train:,} of {total:,} total ({100.0 * n_train / total:.3f} %); "
            f"frozen base {n_frozen:,}")


def split_variables(variables_: dict) -> tuple[Params, Params]:
    """{"params": base, "lora": adapters} -> (base, adapters)."""
    return variables_["params"], variables_[LORA]


def targets_present(adapters: Params) -> Sequence[str]:
    """The target names an adapter tree holds (sorted as ALL_TARGETS)."""
    names = {name for _, _, name, _ in _walk_adapters(adapters)}
    return tuple(t for t in ALL_TARGETS if t in names)
