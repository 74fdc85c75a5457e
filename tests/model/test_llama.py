"""Model behaviour: scan == unrolled, remat keeps gradients, causality, segment masking, attention kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model import attention
from llama2_jax.model.config import LlamaConfig, RematPolicy
from llama2_jax.model.llama import Llama, apply_rope, stack_layers, unstack_layers

CFG = LlamaConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32,
                  dtype="float32")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 16)))


def init_params(cfg=CFG, seed=0):
    return nn.unbox(Llama(cfg).init(jax.random.PRNGKey(seed), TOKENS)["params"])


def loss_and_grad(cfg, params):
    def loss(p):
        logits = Llama(cfg).apply({"params": p}, TOKENS)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, TOKENS[..., None], -1)[..., 0])
    return jax.value_and_grad(loss)(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_params_are_float32_and_compute_dtype_is_bfloat16_by_default():
    cfg = CFG.replace(dtype="bfloat16")
    params = init_params(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits = Llama(cfg).apply({"params": params}, TOKENS)
    assert logits.dtype == jnp.float32  # logits are float32 even with bfloat16 compute
    ref = Llama(CFG).apply({"params": params}, TOKENS)
    assert np.abs(np.asarray(logits - ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()


def test_scanned_equals_unrolled_forward_and_gradient():
    params = init_params()
    scan_cfg = CFG.replace(scan_layers=True)
    stacked = stack_layers(params, CFG.n_layers)
    loss_u, grad_u = loss_and_grad(CFG, params)
    loss_s, grad_s = loss_and_grad(scan_cfg, stacked)
    np.testing.assert_allclose(loss_u, loss_s, rtol=1e-6)
    assert_trees_close(grad_u, unstack_layers(grad_s, CFG.n_layers))


def test_scanned_init_stacks_layers():
    scanned = init_params(CFG.replace(scan_layers=True))
    assert scanned["layers"]["attention"]["wq"].shape == (3, 64, 4, 16)
    assert "layers_0" not in scanned


@pytest.mark.parametrize("policy", [p.value for p in RematPolicy if p != RematPolicy.NONE])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_does_not_change_gradients(policy, scan):
    params = init_params()
    if scan:
        params = stack_layers(params, CFG.n_layers)
    base = CFG.replace(scan_layers=scan)
    loss_a, grad_a = loss_and_grad(base, params)
    loss_b, grad_b = loss_and_grad(base.replace(remat_policy=policy), params)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert_trees_close(grad_a, grad_b)


def test_causal_changing_a_future_token_never_changes_earlier_logits():
    params = init_params()
    logits = np.asarray(Llama(CFG).apply({"params": params}, TOKENS))
    for t in (0, 7, 15):
        changed = TOKENS.at[:, t].set((TOKENS[:, t] + 1) % CFG.vocab_size)
        new = np.asarray(Llama(CFG).apply({"params": params}, changed))
        np.testing.assert_array_equal(new[:, :t], logits[:, :t])
        assert np.abs(new[:, t:] - logits[:, t:]).max() > 1e-4


def test_segments_never_attend_across_documents():
    params = init_params()
    segment_ids = jnp.asarray([[1] * 6 + [2] * 10] * 2)
    positions = jnp.asarray([list(range(6)) + list(range(10))] * 2)
    logits = np.asarray(Llama(CFG).apply({"params": params}, TOKENS, positions=positions, segment_ids=segment_ids))
    alone = np.asarray(Llama(CFG).apply({"params": params}, TOKENS[:, 6:]))
    np.testing.assert_allclose(logits[:, 6:], alone, rtol=1e-5, atol=1e-5)


def test_rope_rotates_half_split_pairs_and_preserves_norm():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    out = apply_rope(x, pos, 10000.0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)  # position 0: identity
    # dimension 0 pairs with dimension H/2 = 4, with angle pos * theta^0 = pos
    t = 3
    expected0 = x[0, t, :, 0] * np.cos(t) - x[0, t, :, 4] * np.sin(t)
    np.testing.assert_allclose(out[0, t, :, 0], expected0, rtol=1e-5)


def naive_attention(q, k, v, mask):
    """Loop over heads with explicit repeat-interleave of KV heads (as Meta's repeat_kv)."""
    n_rep = q.shape[2] // k.shape[2]
    k = np.repeat(np.asarray(k), n_rep, axis=2)
    v = np.repeat(np.asarray(v), n_rep, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def random_qkv(b=2, t=6, s=6, n=4, k=2, h=8):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, s, k, h)),
            jax.random.normal(keys[2], (b, s, k, h)))


@pytest.mark.parametrize("with_segments", [False, True])
def test_xla_attention_matches_naive_gqa(with_segments):
    q, k, v = random_qkv()
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]]) if with_segments else None
    out = attention.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    mask = attention.attention_mask(2, 6, 6, None, seg, seg)
    np.testing.assert_allclose(out, naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_attention_mask_with_offset_into_a_longer_buffer():
    q, k, v = random_qkv(t=2, s=8)
    out = attention.xla_attention(q, k, v, attention.attention_mask(2, 2, 8, jnp.asarray(3)))
    # queries sit at slots 3 and 4: they see keys 0..3 and 0..4 only
    full = naive_attention(q, k[:, :5], v[:, :5], attention.attention_mask(2, 2, 5, jnp.asarray(3)))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


def test_cached_attention_over_the_cache_before_the_write_plus_the_new_tokens():
    """cached_attention(new q/k/v at slots 3 and 4, cache holding slots 0..2) == the naive GQA reference over keys
    0..4, causal by slot; whatever the cache holds at slots >= 3 (stale or unwritten) is ignored."""
    q, k, v = random_qkv(t=2, s=8)
    stale = 100.0 * jnp.ones_like(k[:, 3:])  # would dominate the softmax if it leaked in
    k_cache = jnp.concatenate([k[:, :3], stale], axis=1).transpose(0, 2, 3, 1)  # [B, K, H, S]
    v_cache = jnp.concatenate([v[:, :3], stale], axis=1).transpose(0, 2, 1, 3)  # [B, K, S, H]
    out = attention.cached_attention(q, k[:, 3:5], v[:, 3:5], k_cache, v_cache, jnp.asarray(3))
    full = naive_attention(q, k[:, :5], v[:, :5], attention.attention_mask(2, 2, 5, jnp.asarray(3)))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_segments", [False, True])
def test_jax_nn_attention_path_has_the_same_mask_semantics(with_segments):
    """The cudnn implementation calls jax.nn.dot_product_attention; with implementation=None (XLA, CPU) the same call
    must agree with the reference, including GQA and segment masks."""
    q, k, v = random_qkv()
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]]) if with_segments else None
    mask = None if seg is None else attention.attention_mask(2, 6, 6, None, seg, seg)
    ref = attention.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    out = attention.cudnn_attention(q, k, v, mask, implementation=None)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
