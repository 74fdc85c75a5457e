"""LoRA dirs out of the jax format: merged weights (`convert --merge_lora`) or a PEFT adapter (`convert --to=peft`).

  python -m llama2_jax.convert --from=jax --to=hf   --merge_lora --src=lora_workdir --dst=merged-hf
  python -m llama2_jax.convert --from=jax --to=peft --src=lora_workdir --dst=my-adapter

The PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` for `LlamaForCausalLM`, so that
`peft.PeftModel.from_pretrained(hf_base, dst)` rebuilds our adapted model on the HF export of the base. PEFT's
LoRA layer computes x W^T + (alpha / r) (x A^T) B^T with lora_A [r, in] and lora_B [out, r] (torch Linear layout);
ours is x W + (alpha / r) (x a) b with a [*in, r] and b [r, *out] (lora.py), so lora_A = a^T and lora_B = b^T with
the heads flattened. Our rotary embedding is HF's half-split form, so q_proj/k_proj adapters need no permutation.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import numpy as np

from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.lora import LoraConfig, to_layout

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# our kernel -> the HF LlamaForCausalLM module under model.layers.<i>.
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
              "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}
_PEFT_PREFIX = "base_model.model.model.layers"  # PeftModel -> LoraModel -> LlamaForCausalLM -> LlamaModel


def peft_state_dict(adapters: dict, cfg: LlamaConfig, dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """{PEFT key: torch-layout array} for unrolled or scanned adapters: lora_A [r, in], lora_B [out, r]."""
    adapters = to_layout(adapters, cfg.n_layers, scanned=False)
    out = {}
    for i in range(cfg.n_layers):
        for kernels in adapters[f"layers_{i}"].values():
            for name, pair in kernels.items():
                a, b = np.asarray(pair["a"]), np.asarray(pair["b"])
                rank = a.shape[-1]
                key = f"{_PEFT_PREFIX}.{i}.{HF_MODULES[name]}"
                out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
                out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    if dtype is not None:
        out = {k: v.astype(dtype) for k, v in out.items()}
    return out


def peft_adapter_config(lora_cfg: LoraConfig, base_name: Optional[str] = None) -> dict:
    """The adapter_config.json PEFT reads (unlisted fields take PEFT's defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in lora_cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def save_peft(dst, adapters: dict, cfg: LlamaConfig, lora_cfg: LoraConfig, base_name: Optional[str] = None,
              dtype: Optional[str] = None) -> None:
    """Write `dst/adapter_config.json` and `dst/adapter_model.safetensors`."""
    from safetensors.numpy import save_file

    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(adapters, cfg, dtype), str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (dst / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(lora_cfg, base_name), indent=2) + "\n")


def export_peft(src_format: str, src, dst, dtype: Optional[str] = None) -> None:
    """`convert --to=peft`: a jax-format LoRA dir -> a PEFT adapter folder."""
    if src_format != "jax" or not checkpoint.is_lora_dir(src):
        raise ValueError(f"--to=peft needs --from=jax and a LoRA dir as --src ({checkpoint.LORA_CONFIG_FILE} "
                         f"+ adapters); {src} is not one")
    cfg = checkpoint.load_config(src).replace(scan_layers=False)
    adapters, lora_cfg, _ = checkpoint.load_adapters(src, cfg)
    save_peft(dst, adapters, cfg, lora_cfg, dtype=dtype)  # the base is ours (jax format): PEFT gets no name


def check_merge_flag(src_format: str, src, merge_lora: bool) -> None:
    """A LoRA dir converts to full weights only with --merge_lora; --merge_lora needs a LoRA dir."""
    is_lora = src_format == "jax" and checkpoint.is_lora_dir(src)
    if is_lora and not merge_lora:
        raise ValueError(f"--src {src} is a LoRA dir: pass --merge_lora to write merged weights, or --to=peft to "
                         f"write the adapter alone")
    if merge_lora and not is_lora:
        raise ValueError(f"--merge_lora needs --from=jax and a LoRA dir as --src ({checkpoint.LORA_CONFIG_FILE}); "
                         f"{src} is not one")
