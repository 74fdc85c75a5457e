"""Logit parity with HF transformers' LlamaForCausalLM (PyTorch, CPU) on random weights, float32."""

import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, stack_layers

hf_reference = pytest.importorskip("helpers.hf_reference", reason="torch/transformers not installed")

CONFIGS = {
    "mha": LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32,
                       max_seq_len=64, dtype="float32"),
    "gqa": LlamaConfig(vocab_size=300, dim=192, n_layers=3, n_heads=6, n_kv_heads=2, multiple_of=64,
                       ffn_dim_multiplier=1.3, rope_theta=500000.0, norm_eps=1e-6, max_seq_len=64, dtype="float32"),
}


def assert_logits_close(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert ours.dtype == np.float32
    tol = 1e-4 * np.abs(theirs).max()
    np.testing.assert_array_less(np.abs(ours - theirs).max(), tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_hf(name, scan):
    cfg = CONFIGS[name].replace(scan_layers=scan)
    model = hf_reference.hf_model(cfg)
    params = hf_reference.params_from_hf(model, cfg)
    if scan:
        params = stack_layers(params, cfg.n_layers)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(3, 37))
    ours = Llama(cfg).apply({"params": params}, jnp.asarray(tokens))
    assert_logits_close(ours, hf_reference.hf_logits(model, tokens))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_attention_logits_match_hf(name):
    """attention_impl="chunked" with blocks of 8 queries (37 tokens: the last block is padded)."""
    cfg = CONFIGS[name].replace(attention_impl="chunked", attention_block_size=8)
    model = hf_reference.hf_model(cfg)
    params = hf_reference.params_from_hf(model, cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(3, 37))
    ours = Llama(cfg).apply({"params": params}, jnp.asarray(tokens))
    assert_logits_close(ours, hf_reference.hf_logits(model, tokens))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_packed_rows_match_separate_documents(impl):
    """Two documents packed in one row (segment ids, restarted positions) give each document's own HF logits."""
    cfg = CONFIGS["gqa"].replace(attention_impl=impl, attention_block_size=5)
    model = hf_reference.hf_model(cfg, seed=3)
    params = hf_reference.params_from_hf(model, cfg)
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, cfg.vocab_size, 11), rng.integers(0, cfg.vocab_size, 9)
    tokens = np.concatenate([doc_a, doc_b, np.zeros(4, np.int64)])[None]
    segment_ids = np.array([[1] * 11 + [2] * 9 + [0] * 4])
    positions = np.array([list(range(11)) + list(range(9)) + [0] * 4])
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions),
                                       segment_ids=jnp.asarray(segment_ids)))
    assert_logits_close(ours[:, :11], hf_reference.hf_logits(model, doc_a[None]))
    assert_logits_close(ours[:, 11:20], hf_reference.hf_logits(model, doc_b[None]))
