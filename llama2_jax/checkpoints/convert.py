"""Weight conversion between HF transformers, Meta's consolidated shards and our params (the "jax" format).

  python -m llama2_jax.convert --from=hf   --to=jax  --src=Llama-2-7b-hf --dst=ckpt/7b
  python -m llama2_jax.convert --from=meta --to=jax  --src=llama-2-13b   --dst=ckpt/13b
  python -m llama2_jax.convert --from=jax  --to=hf   --src=workdir      --dst=my-llama-hf --dtype=bfloat16
  python -m llama2_jax.convert --from=jax  --to=meta --src=ckpt/70b     --dst=llama-2-70b --num_shards=8

Every conversion reads the source tensor by tensor (safetensors `safe_open`, `torch.load(mmap=True)`) into one
host copy of our param tree, then writes the destination tensor by tensor (HF: one safetensors shard at a time;
Meta: one model-parallel shard at a time).

Layouts. Torch Linear weights are [out, in]; ours are [in, out] with heads split out (model.py). Our rotary
embedding is HF's half-split form, so HF q_proj/k_proj rows map over unchanged. Meta's wq/wk rows are in the
interleaved form and are permuted on import (`permute_meta_to_hf`) and back on export (`permute_hf_to_meta`).
Meta's model-parallel shards concatenate wq, wk, wv, w1, w3 and output along dim 0 (output rows), wo and w2 along
dim 1 (input columns), tok_embeddings along dim 1; norms are replicated; `rope.freqs` is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from llama2_jax import paths as output_paths
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.checkpoints import peft as convert_peft
from llama2_jax.checkpoints import storage
from llama2_jax.model.config import LlamaConfig, ffn_hidden_dim
from llama2_jax.text import hf_tokenizer

FORMATS = ("hf", "meta", "jax")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Meta's model-parallel shard counts by (dim, n_layers): 7B, 13B, 34B, 70B; 1 for any other size.
META_NUM_SHARDS = {(4096, 32): 1, (5120, 40): 2, (8192, 48): 4, (8192, 80): 8}
_KNOWN_FFN_ARGS = ((256, None), (256, 1.0), (4096, 1.3))  # (multiple_of, ffn_dim_multiplier) of 7B/13B, 34B, 70B
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old HF buffers
_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def permute_meta_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved-RoPE rows -> HF's half-split rows (HF's `permute` in convert_llama_weights_to_hf).

    Args:
      w: wq [n_heads * H, D] (or wk with n_kv_heads); within each head, rows (2i, 2i+1) form rotary pair i.
      n_heads: heads in w.
    Returns:
      [n_heads * H, D]: per head the even rows then the odd rows, so pair i is (i, i + H/2) as `rotate_half` wants.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_hf_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_meta_to_hf`: per head, [evens; odds] rows [n_heads * H, D] -> interleaved pairs."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One weight under its three names. `kind` says how the torch [out, in] matrix maps to ours:
    plain (same array), linear (transpose), q/k/v ([n*H, D] -> [D, n, H]), o ([D, N*H] -> [N, H, D]).
    q and k carry rotary embeddings: their Meta rows are permuted."""

    ours: tuple[str, ...]  # path in our param tree
    hf: str
    meta: str
    kind: str
    meta_dim: Optional[int]  # Meta model-parallel concat axis (None = replicated)


_ROTARY = ("q", "k")  # kinds whose rows Meta stores in the interleaved rotary form
_LAYER = (  # (ours within the block, hf suffix, meta suffix, kind, meta_dim)
    (("attention", "wq"), "self_attn.q_proj.weight", "attention.wq.weight", "q", 0),
    (("attention", "wk"), "self_attn.k_proj.weight", "attention.wk.weight", "k", 0),
    (("attention", "wv"), "self_attn.v_proj.weight", "attention.wv.weight", "v", 0),
    (("attention", "wo"), "self_attn.o_proj.weight", "attention.wo.weight", "o", 1),
    (("feed_forward", "w1"), "mlp.gate_proj.weight", "feed_forward.w1.weight", "linear", 0),
    (("feed_forward", "w3"), "mlp.up_proj.weight", "feed_forward.w3.weight", "linear", 0),
    (("feed_forward", "w2"), "mlp.down_proj.weight", "feed_forward.w2.weight", "linear", 1),
    (("attention_norm", "scale"), "input_layernorm.weight", "attention_norm.weight", "plain", None),
    (("ffn_norm", "scale"), "post_attention_layernorm.weight", "ffn_norm.weight", "plain", None),
)


def tensor_specs(cfg: LlamaConfig) -> list[TensorSpec]:
    """Every weight of the model, embeddings first, then layer by layer, then the final norm and output."""
    specs = [TensorSpec(("tok_embeddings", "embedding"), "model.embed_tokens.weight", "tok_embeddings.weight",
                        "plain", 1)]
    for i in range(cfg.n_layers):
        specs += [TensorSpec((f"layers_{i}",) + ours, f"model.layers.{i}.{hf}", f"layers.{i}.{meta}", kind, dim)
                  for ours, hf, meta, kind, dim in _LAYER]
    specs.append(TensorSpec(("norm", "scale"), "model.norm.weight", "norm.weight", "plain", None))
    specs.append(TensorSpec(("output",), "lm_head.weight", "output.weight", "linear", 0))
    return specs


def _heads(spec: TensorSpec, cfg: LlamaConfig) -> int:
    return cfg.n_heads if spec.kind in ("q", "o") else cfg.n_kv_heads


def torch_shape(spec: TensorSpec, cfg: LlamaConfig) -> tuple[int, ...]:
    """The tensor's shape in the torch checkpoints ([out, in] for matrices)."""
    d, f, v, nh, kh = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"embedding": (v, d), "scale": (d,), "output": (v, d), "wq": (nh, d), "wk": (kh, d), "wv": (kh, d),
            "wo": (d, nh), "w1": (f, d), "w3": (f, d), "w2": (d, f)}[spec.ours[-1]]


def to_ours(spec: TensorSpec, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """torch layout (HF rotary form) -> ours: [out, in] -> [in, out]; [n*H, D] -> [D, n, H]; [D, N*H] -> [N, H, D]."""
    if spec.kind in ("q", "k", "v"):
        return w.T.reshape(cfg.dim, _heads(spec, cfg), cfg.head_dim)
    if spec.kind == "o":
        return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)
    return w.T if spec.kind == "linear" else w


def from_ours(spec: TensorSpec, a: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Inverse of `to_ours` (views, no copies)."""
    if spec.kind in ("q", "k", "v", "o"):
        return a.reshape(cfg.dim, -1).T if spec.kind != "o" else a.reshape(-1, cfg.dim).T
    return a.T if spec.kind == "linear" else a


def _assemble(cfg: LlamaConfig, read: Callable[[TensorSpec], np.ndarray], dtype, source: str):
    """Our param tree from `read(spec)` -> torch-layout array (HF rotary form), one tensor at a time."""
    flat = {}
    for spec in tqdm(tensor_specs(cfg), desc=f"reading {source}", unit="tensor"):
        w = read(spec)
        if tuple(w.shape) != torch_shape(spec, cfg):
            raise ValueError(f"{source}: tensor {spec.hf} ({spec.meta}) has shape {tuple(w.shape)}, expected "
                             f"{torch_shape(spec, cfg)} from the config")
        w = to_ours(spec, w, cfg)
        flat[spec.ours] = np.ascontiguousarray(w if dtype is None else w.astype(jnp.dtype(dtype)))
    dtype_name = flat[("output",)].dtype.name
    return traverse_util.unflatten_dict(flat), cfg.replace(param_dtype=dtype_name) if dtype_name in DTYPES else cfg


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting HF or Meta checkpoints needs PyTorch: pip install torch") from e
    return torch


def _torch_load(path: pathlib.Path) -> dict:
    """A state dict whose tensors stay on disk (mmap) until used; old non-zip files are read whole."""
    try:
        return _torch().load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        return _torch().load(path, map_location="cpu", weights_only=True)


def _to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, bitwise (bfloat16 through an int16 view)."""
    torch = _torch()
    return t.view(torch.int16).numpy().view(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _to_torch(a: np.ndarray, dtype=None):
    """numpy (cast to dtype) -> contiguous torch tensor owning only these bytes (bfloat16 through an int16 view)."""
    torch = _torch()
    a = np.array(a, dtype=dtype, copy=True, order="C")
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == jnp.bfloat16 else \
        torch.from_numpy(a)


# ------------------------------------------------------------------------------------------------------ configs


def _known_ffn_args(dim: int, hidden_dim: int):
    """(multiple_of, ffn_dim_multiplier) of a released size whose FFN rule gives hidden_dim, else None."""
    return next(((m, mult) for m, mult in _KNOWN_FFN_ARGS if ffn_hidden_dim(dim, m, mult) == hidden_dim), None)


def _meta_ffn_args(cfg: LlamaConfig):
    """(multiple_of, ffn_dim_multiplier) with which Meta's FFN rule reproduces cfg.hidden_dim exactly."""
    if ffn_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier) == cfg.hidden_dim:
        return cfg.multiple_of, cfg.ffn_dim_multiplier
    # Otherwise multiple_of=1 and a multiplier with int(multiplier * int(8 * dim / 3)) == hidden_dim.
    return _known_ffn_args(cfg.dim, cfg.hidden_dim) or (1, (cfg.hidden_dim + 0.5) / int(2 * 4 * cfg.dim / 3))


def _check_hf_config(hf: dict) -> None:
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures or hf.get("model_type", "llama") != "llama":
        raise ValueError(f"unsupported architecture {architectures} / model_type {hf.get('model_type')!r} in "
                         "config.json: expected LlamaForCausalLM / llama")
    rope, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"unsupported rope scaling {rope_type!r} in config.json: only Llama 2's plain RoPE")
    if hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]) * hf["num_attention_heads"] != \
            hf["hidden_size"]:
        raise ValueError(f"unsupported head_dim {hf['head_dim']} in config.json: must be hidden_size / num_heads")
    for key, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, allowed) != allowed:
            raise ValueError(f"unsupported {key}={hf[key]!r} in config.json: Llama 2 has {allowed!r}")


def config_from_hf(hf: dict) -> LlamaConfig:
    """HF config.json dict -> LlamaConfig (hidden_dim = intermediate_size); unsupported variants raise."""
    _check_hf_config(hf)
    dim, hidden = hf["hidden_size"], hf["intermediate_size"]
    multiple_of, multiplier = _known_ffn_args(dim, hidden) or (256, None)
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return LlamaConfig(vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       multiple_of=multiple_of, ffn_dim_multiplier=multiplier, hidden_dim=hidden,
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       max_seq_len=hf.get("max_position_embeddings", 4096))


def config_to_hf(cfg: LlamaConfig, dtype_name: str) -> dict:
    """LlamaConfig -> HF config.json dict (`rope_theta` at the top level: read by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "initializer_range": 0.02,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "tie_word_embeddings": False,
        "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def config_from_meta(meta: dict, vocab_size: int) -> LlamaConfig:
    """Meta params.json dict -> LlamaConfig; `vocab_size` is used when params.json has -1 (Meta's released files)."""
    if meta.get("use_scaled_rope"):
        raise ValueError("unsupported rope scaling use_scaled_rope=true in params.json: only Llama 2's plain RoPE")
    return LlamaConfig(vocab_size=meta["vocab_size"] if meta.get("vocab_size", -1) > 0 else vocab_size,
                       dim=meta["dim"], n_layers=meta["n_layers"], n_heads=meta["n_heads"],
                       n_kv_heads=meta.get("n_kv_heads") or meta["n_heads"],
                       multiple_of=meta.get("multiple_of", 256), ffn_dim_multiplier=meta.get("ffn_dim_multiplier"),
                       norm_eps=meta.get("norm_eps", 1e-5), rope_theta=float(meta.get("rope_theta", 10000.0)))


def config_to_meta(cfg: LlamaConfig) -> dict:
    multiple_of, multiplier = _meta_ffn_args(cfg)
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
            "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}


# ----------------------------------------------------------------------------------------------------------- HF


def _hf_weight_files(src: pathlib.Path, handles: dict) -> dict[str, pathlib.Path]:
    """{tensor name: file} from model.safetensors(.index.json) or pytorch_model.bin(.index.json)."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index_name).exists():
            weight_map = json.loads((src / index_name).read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (src / f).exists()})
            if missing:
                raise FileNotFoundError(f"{src}: shard(s) listed in {index_name} are missing: {', '.join(missing)}")
            return {name: src / f for name, f in weight_map.items()}
        if (src / single_name).exists():
            return {name: src / single_name for name in _open_weights(src / single_name, handles).keys()}
    raise FileNotFoundError(f"{src} has config.json but no weights: expected model.safetensors, "
                            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _open_weights(path: pathlib.Path, handles: dict):
    """A `safe_open` handle or an mmap'ed state dict, opened once per file."""
    if path not in handles:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            try:  # a truncated or corrupt file fails here (SafetensorError), before any tensor is read
                handles[path] = safe_open(str(path), framework="pt")
            except Exception as error:  # noqa: BLE001 (safetensors' error class is not importable in every version)
                raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        else:
            handles[path] = _torch_load(path)
    return handles[path]


def _read_hf(files: dict, handles: dict, name: str) -> np.ndarray:
    handle = _open_weights(files[name], handles)
    return _to_numpy(handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name])


def load_hf(src, dtype: Optional[str] = None) -> tuple[dict, LlamaConfig]:
    """HF `LlamaForCausalLM` folder (config.json + safetensors or pytorch_model*.bin) -> (params, config)."""
    src = pathlib.Path(src)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} is not an HF checkpoint: expected config.json and model*.safetensors or "
                                "pytorch_model*.bin")
    hf_config = json.loads((src / "config.json").read_text())
    cfg, handles = config_from_hf(hf_config), {}
    files = _hf_weight_files(src, handles)
    tied = hf_config.get("tie_word_embeddings") and "lm_head.weight" not in files
    expected = {spec.hf for spec in tensor_specs(cfg)} - ({"lm_head.weight"} if tied else set())
    missing = sorted(expected - set(files))
    unexpected = sorted(n for n in set(files) - expected if not _HF_IGNORED.fullmatch(n))
    if missing or unexpected:
        raise ValueError(f"{src}: tensors do not match config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    tie = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
    return _assemble(cfg, lambda spec: _read_hf(files, handles, tie.get(spec.hf, spec.hf)), dtype, str(src))


def _parse_size(size) -> int:
    """'5GB', '500MB', '20KB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"bad size {size!r}: use e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy grouping of (name, bytes), in order, into files of at most max_bytes (a bigger tensor gets its own)."""
    shards, total = [[]], 0
    for name, nbytes in sizes:
        if shards[-1] and total + nbytes > max_bytes:
            shards, total = shards + [[]], 0
        shards[-1].append(name)
        total += nbytes
    return shards


def save_hf(dst, params: dict, cfg: LlamaConfig, dtype: Optional[str] = None,
            max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> None:
    """Our params (unrolled) -> HF folder: config.json, generation_config.json and model.safetensors, or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json when above `max_shard_size`."""
    from safetensors.torch import save_file

    dst, np_dtype = pathlib.Path(dst), None if dtype is None else jnp.dtype(dtype)
    specs = {spec.hf: spec for spec in tensor_specs(cfg)}
    flat = traverse_util.flatten_dict(params)
    arrays = {name: flat[spec.ours] for name, spec in specs.items()}
    sizes = [(name, a.size * (np_dtype or a.dtype).itemsize) for name, a in arrays.items()]
    shards = _plan_shards(sizes, _parse_size(max_shard_size))
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    dst.mkdir(parents=True, exist_ok=True)
    for file_name, shard in tqdm(list(zip(files, shards)), desc=f"writing {dst}", unit="file"):
        tensors = {name: _to_torch(from_ours(specs[name], arrays[name], cfg), np_dtype) for name in shard}
        save_file(tensors, str(dst / file_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                 "weight_map": {name: file_name for file_name, shard in zip(files, shards) for name in shard}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = dtype or arrays["model.embed_tokens.weight"].dtype.name
    (dst / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype_name), indent=2) + "\n")
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------- Meta


def _meta_shard_paths(src: pathlib.Path) -> list[pathlib.Path]:
    """consolidated.00.pth … consolidated.NN.pth in order; gaps are named in the error."""
    found = {int(m.group(1)): src / m.group(0) for p in src.iterdir() if (m := _META_SHARD.fullmatch(p.name))}
    if not (src / "params.json").exists() or not found:
        raise FileNotFoundError(f"{src} is not a Meta checkpoint: expected params.json and consolidated.NN.pth")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise FileNotFoundError(f"{src}: missing Meta shard(s) {', '.join(missing)}")
    return [found[i] for i in sorted(found)]


def _check_meta_shards(src: pathlib.Path, shards: list, cfg: LlamaConfig) -> None:
    """All shards there (the first shard's wq rows tell how many there should be) and no foreign tensors."""
    rows = shards[0]["layers.0.attention.wq.weight"].shape[0]
    expected = cfg.n_heads * cfg.head_dim // rows if rows else len(shards)
    if expected > len(shards):
        missing = [f"consolidated.{i:02d}.pth" for i in range(len(shards), expected)]
        raise FileNotFoundError(f"{src}: layers.0.attention.wq.weight in consolidated.00.pth has {rows} rows, so the "
                                f"model has {expected} shards; missing {', '.join(missing)}")
    unexpected = sorted(set(shards[0]) - {spec.meta for spec in tensor_specs(cfg)} - {"rope.freqs"})
    if unexpected:
        raise ValueError(f"{src}/consolidated.00.pth has tensors not in the model of params.json: {unexpected[:5]}")


def _merge_meta(spec: TensorSpec, shards: list, paths: list[pathlib.Path], cfg: LlamaConfig) -> np.ndarray:
    """Full tensor [out, in] from the model-parallel pieces, rotary rows permuted to the HF form."""
    for shard, path in zip(shards, paths):
        if spec.meta not in shard:
            raise KeyError(f"{path} has no tensor {spec.meta}")
    pieces = [shard[spec.meta] for shard in shards]
    w = _to_numpy(pieces[0] if spec.meta_dim is None or len(pieces) == 1 else _torch().cat(pieces, spec.meta_dim))
    return permute_meta_to_hf(w, _heads(spec, cfg)) if spec.kind in _ROTARY else w


def load_meta(src, dtype: Optional[str] = None) -> tuple[dict, LlamaConfig]:
    """Meta folder (params.json + consolidated.NN.pth model-parallel shards) -> (params, config)."""
    src = pathlib.Path(src)
    paths = _meta_shard_paths(src)
    shards = [_torch_load(p) for p in paths]
    cfg = config_from_meta(json.loads((src / "params.json").read_text()),
                           vocab_size=shards[0]["tok_embeddings.weight"].shape[0])
    _check_meta_shards(src, shards, cfg)
    return _assemble(cfg, lambda spec: _merge_meta(spec, shards, paths, cfg), dtype, str(src))


def default_num_shards(cfg: LlamaConfig) -> int:
    """Meta's model-parallel shard count for the released sizes (7B 1, 13B 2, 34B 4, 70B 8), else 1."""
    return META_NUM_SHARDS.get((cfg.dim, cfg.n_layers), 1)


def save_meta(dst, params: dict, cfg: LlamaConfig, num_shards: Optional[int] = None,
              dtype: Optional[str] = None) -> None:
    """Our params (unrolled) -> Meta folder: params.json + consolidated.NN.pth, one shard in memory at a time."""
    num_shards = num_shards or default_num_shards(cfg)
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "hidden_dim": cfg.hidden_dim,
             "vocab_size": cfg.vocab_size, "dim": cfg.dim}
    bad = [f"{name}={size}" for name, size in sizes.items() if size % num_shards]
    if bad:
        raise ValueError(f"cannot split into {num_shards} Meta shards: {', '.join(bad)} not divisible by {num_shards}")
    dst, np_dtype = pathlib.Path(dst), None if dtype is None else jnp.dtype(dtype)
    dst.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params)
    for s in tqdm(range(num_shards), desc=f"writing {dst}", unit="shard"):
        state = {}
        for spec in tensor_specs(cfg):
            w = from_ours(spec, flat[spec.ours], cfg)
            w = permute_hf_to_meta(w, _heads(spec, cfg)) if spec.kind in _ROTARY else w
            w = w if spec.meta_dim is None else np.split(w, num_shards, axis=spec.meta_dim)[s]
            state[spec.meta] = _to_torch(w, np_dtype)
        _torch().save(state, dst / f"consolidated.{s:02d}.pth")
        del state
    (dst / "params.json").write_text(json.dumps(config_to_meta(cfg), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------- any -> any


def load_jax(src, dtype: Optional[str] = None) -> tuple[dict, LlamaConfig]:
    """Converted dir or trainer workdir (latest step) -> unrolled host params (cast to dtype) and config."""
    cfg = checkpoint.load_config(src).replace(scan_layers=False)
    return checkpoint.load_params(src, cfg.replace(param_dtype=dtype) if dtype else cfg)


def convert(src_format: str, dst_format: str, src, dst, dtype: Optional[str] = None,
            num_shards: Optional[int] = None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, merge_lora: bool = False,
            tokenizer: Optional[str] = None) -> None:
    """Any format -> any format through one host copy of our params. dtype None keeps the source's dtype, except
    for the jax format, which defaults to float32 (our master weights). LoRA dirs: convert_peft.py. `tokenizer` (a
    SentencePiece file, --to=hf only) is exported next to the weights (hf_tokenizer.save_hf_tokenizer)."""
    for flag, value, allowed in (("--from", src_format, FORMATS), ("--to", dst_format, FORMATS + ("peft",)),
                                 ("--dtype", dtype or DTYPES[0], DTYPES)):
        if value not in allowed:
            raise ValueError(f"{flag}={value!r}: expected one of {allowed}")
    if "://" not in str(src) and not pathlib.Path(src).exists():
        raise FileNotFoundError(f"--src {src} does not exist")
    hf_tokenizer.check_export(tokenizer, dst_format)
    created = "://" not in str(dst) and not pathlib.Path(dst).exists()
    output_paths.prepare_output_dir(str(dst), "--dst")  # created before anything is read (ValueError, FileExistsError)
    if dst_format == "peft":
        return storage.write_new_dir(dst, lambda: convert_peft.export_peft(src_format, src, dst, dtype),
                                     created=created)
    readers = {"hf": load_hf, "meta": load_meta, "jax": load_jax}
    writers = {"hf": lambda p, c: save_hf(dst, p, c, max_shard_size=max_shard_size),
               "meta": lambda p, c: save_meta(dst, p, c, num_shards=num_shards),
               "jax": lambda p, c: checkpoint.save_params(dst, p, c)}

    def read_and_write():
        convert_peft.check_merge_flag(src_format, src, merge_lora)
        params, cfg = readers[src_format](src, dtype or ("float32" if dst_format == "jax" else None))
        _write(writers[dst_format], params, cfg, tokenizer, dst)

    storage.write_new_dir(dst, read_and_write, created=created)  # nothing partial is left on any failure


def _write(writer, params, cfg: LlamaConfig, tokenizer, dst) -> None:
    writer(params, cfg)
    if tokenizer is not None:
        hf_tokenizer.save_hf_tokenizer(tokenizer, dst, model_max_length=cfg.max_seq_len)
