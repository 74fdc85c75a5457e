"""`LlamaConfig`: the frozen description of a Llama 2 model, its size presets, the FFN rule and parameter counts.

The model never sees an `ml_collections.ConfigDict`; trainers convert once with `LlamaConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Optional


class RematPolicy(str, enum.Enum):
    """What the backward pass may keep instead of recomputing (mapped to `jax.checkpoint_policies` in model.py)."""

    NONE = "none"  # no remat: keep every activation (fastest, most memory)
    DOTS = "dots"  # keep matmul outputs, recompute elementwise ops
    DOTS_NO_BATCH = "dots_no_batch"  # keep matmuls without batch dims (weights x activations), recompute attention
    MINIMAL = "minimal"  # keep only each block's input: recompute the whole block (least memory)


class AttentionImpl(str, enum.Enum):
    """Which kernel computes softmax(q k^T / sqrt(d)) v (see attention.py)."""

    XLA = "xla"  # reference einsum + float32 softmax; runs everywhere
    CUDNN = "cudnn"  # jax.nn.dot_product_attention(implementation="cudnn"): fused flash attention on NVIDIA GPUs
    CHUNKED = "chunked"  # the reference math over query blocks, each recomputed in the backward pass: no [T, T] tensor
    SPLASH = "splash"  # jax's Pallas TPU splash (flash) attention kernel, sharded with shard_map; TPU (or interpret)


_DTYPES = ("float32", "bfloat16", "float16")
SPLASH_BLOCK_MULTIPLE = 128  # the splash kernel tiles keys by the TPU's 128 lanes (attention.splash_attention)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FFN width: int(2/3 * 4 * dim), times the multiplier (truncated), rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def check_known_fields(cls, values: dict[str, Any]) -> None:
    """ValueError naming the keys of `values` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of one Llama 2 model.

    `hidden_dim` is derived from (dim, multiple_of, ffn_dim_multiplier) by Meta's rule unless given explicitly
    (HF configs carry `intermediate_size`, so converted models set it directly).

    The fields split in two: the *architecture* (every parameter shape depends on it, plus norm_eps, rope_theta and
    max_seq_len) and the *numerics* (`NUMERICS_FIELDS`: how it is computed and stored). A trainer that starts from a
    checkpoint takes the architecture from the checkpoint and the numerics from its config (`with_numerics`).
    """

    # How the model is computed and stored, not what it is: overridable on top of a checkpoint's architecture.
    NUMERICS_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "scan_layers", "remat_policy",
                                                  "attention_impl", "attention_block_size",
                                                  "attention_kv_block_size", "attention_interpret")

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head attention)
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # None = Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (master weights)
    scan_layers: bool = False  # nn.scan over the blocks: one compiled block, stacked params [L, ...]
    remat_policy: str = RematPolicy.NONE.value
    attention_impl: str = AttentionImpl.XLA.value
    # "chunked": queries per block ([B, N, block, S] scores live at once); "splash": the kernel's query block.
    attention_block_size: int = 512
    # "splash": the kernel's key/value block. 512/512 are MaxText's splash defaults (base.yml sa_block_*), which it
    # runs on v5e, v5p and v6e alike; both must be multiples of 128 (the TPU lane width) for splash.
    attention_kv_block_size: int = 512
    attention_interpret: bool = False  # "splash": run the Pallas kernel in interpret mode (any backend, slow: tests)
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' input while training (lora.py); no effect without them

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.hidden_dim is None:
            object.__setattr__(self, "hidden_dim", ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier))
        # Accept the enums themselves as well as their string values; store strings (hashable, serialisable).
        for name in ("remat_policy", "attention_impl"):
            value = getattr(self, name)
            if isinstance(value, enum.Enum):
                object.__setattr__(self, name, value.value)
        self._validate()

    def _validate(self):
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "max_seq_len",
                    "attention_block_size", "attention_kv_block_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        if not self.norm_eps > 0:
            raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"LlamaConfig.ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LlamaConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"LlamaConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        _check_enum("remat_policy", self.remat_policy, RematPolicy)
        _check_enum("attention_impl", self.attention_impl, AttentionImpl)
        if not isinstance(self.attention_interpret, bool):
            raise ValueError(f"LlamaConfig.attention_interpret must be True or False, got {self.attention_interpret!r}")
        if self.attention_impl == AttentionImpl.SPLASH.value:
            for name in ("attention_block_size", "attention_kv_block_size"):
                if getattr(self, name) % SPLASH_BLOCK_MULTIPLE:
                    raise ValueError(f"LlamaConfig.{name} must be a multiple of {SPLASH_BLOCK_MULTIPLE} with "
                                     f"attention_impl='splash', got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with fields changed; the FFN width is re-derived unless `hidden_dim` is among the changes."""
        if "hidden_dim" not in changes and {"dim", "multiple_of", "ffn_dim_multiplier"} & changes.keys():
            changes["hidden_dim"] = None
        return dataclasses.replace(self, **changes)

    def with_numerics(self, source: Any) -> "LlamaConfig":
        """This architecture with the `NUMERICS_FIELDS` of `source` (a LlamaConfig, or a mapping such as a
        ConfigDict holding those fields)."""
        if isinstance(source, LlamaConfig):
            return self.replace(**{name: getattr(source, name) for name in self.NUMERICS_FIELDS})
        return self.replace(**{name: source[name] for name in self.NUMERICS_FIELDS})

    def architecture_differences(self, other: "LlamaConfig") -> list[tuple[str, Any, Any]]:
        """[(field, self's value, other's value)] for the fields that make the parameter shapes or the function
        differ (everything but the numerics and max_seq_len, which no parameter depends on)."""
        ignored = set(self.NUMERICS_FIELDS) | {"max_seq_len"}
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name not in ignored and getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        """Build from a plain dict (or ConfigDict.to_dict()); unknown keys are an error naming them."""
        check_known_fields(cls, values)
        return cls(**values)

    def param_count(self) -> int:
        """Exact parameter count (both embedding matrices included, as in the published figures)."""
        d, h, kv = self.dim, self.head_dim, self.n_kv_heads
        attention = d * self.n_heads * h * 2 + d * kv * h * 2  # wq, wo + wk, wv
        mlp = 3 * d * self.hidden_dim
        per_layer = attention + mlp + 2 * d  # two RMSNorm gains
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    def matmul_param_count(self) -> int:
        """Parameters that take part in matmuls per token (everything but the norms and the input embedding)."""
        return self.param_count() - self.vocab_size * self.dim - (2 * self.n_layers + 1) * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6·N_matmul + 12·L·d·T (forward + backward, attention scores included)."""
        return 6.0 * self.matmul_param_count() + 12.0 * self.n_layers * self.dim * seq_len


def _check_enum(name: str, value: str, enum_type) -> None:
    allowed = [member.value for member in enum_type]
    if value not in allowed:
        raise ValueError(f"LlamaConfig.{name} must be one of {allowed}, got {value!r}")


PRESETS: dict[str, LlamaConfig] = {
    # CPU-friendly: trains in minutes on two cores. vocab is the tiny default tokenizer's.
    "tiny": LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32,
                        max_seq_len=256),
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256),
    "13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256),
    # 34B was never released; dims from Code Llama 34B, which was initialised from it.
    "34b": LlamaConfig(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0),
    "70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    """A preset by name ('tiny', '7b', '13b', '34b', '70b'), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
