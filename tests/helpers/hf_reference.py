"""Helpers shared by the parity tests: a random HF `LlamaForCausalLM` and its weights in our layout.

The mapping here is written independently of llama2_jax/checkpoints/convert.py on purpose (a test should not share the code it
checks). HF stores torch Linear weights as [out, in]; our kernels are [in, out] with the heads split out.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: HF parity tests need it (pip install torch)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

from llama2_jax.model.config import LlamaConfig  # noqa: E402


def hf_model(cfg: LlamaConfig, seed: int = 0):
    """A float32 HF Llama with the architecture of `cfg` and random weights (std 0.02, norms perturbed)."""
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial gains, so a missing gain is caught
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def params_from_hf(model, cfg: LlamaConfig) -> dict:
    """Our unrolled param tree (numpy float32) from an HF model's state dict."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    params = {
        "tok_embeddings": {"embedding": sd["model.embed_tokens.weight"]},
        "norm": {"scale": sd["model.norm.weight"]},
        "output": sd["lm_head.weight"].T,
    }
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        params[f"layers_{i}"] = {
            "attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "ffn_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "attention": {
                "wq": sd[p + "self_attn.q_proj.weight"].T.reshape(d, n, h),
                "wk": sd[p + "self_attn.k_proj.weight"].T.reshape(d, k, h),
                "wv": sd[p + "self_attn.v_proj.weight"].T.reshape(d, k, h),
                "wo": sd[p + "self_attn.o_proj.weight"].T.reshape(n, h, d),
            },
            "feed_forward": {
                "w1": sd[p + "mlp.gate_proj.weight"].T,
                "w3": sd[p + "mlp.up_proj.weight"].T,
                "w2": sd[p + "mlp.down_proj.weight"].T,
            },
        }
    return params


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
