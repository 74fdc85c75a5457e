"""attention_impl="splash" (jax's Pallas TPU splash attention kernel), run on CPU in Pallas interpret mode: outputs and
gradients equal the reference "xla" kernel's, with GQA, packed segments and a padded tail, alone and inside the
sharded model; selecting it on a CPU without interpret mode is a one-line config error.

Covers llama2_jax.model.attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model import attention
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.training import checks

# 200 tokens: not a multiple of the 128-lane blocks, so the kernel runs on a padded tail of 56 slots.
LENGTH = 200


def random_qkv(b=2, t=LENGTH, n=4, k=2, h=64, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, cotangent = (jax.random.normal(keys[i], (b, t, n, h)) for i in (0, 3))
    k_, v = (jax.random.normal(keys[i], (b, t, k, h)) for i in (1, 2))
    return tuple(x.astype(dtype) for x in (q, k_, v)) + (cotangent,)


def packed_segments(t=LENGTH):
    """Row 0: three documents (one crossing the 128-token block boundary); row 1: one document, then padding."""
    seg = np.ones((2, t), np.int32)
    seg[0, 70:150], seg[0, 150:] = 2, 3
    seg[1, 170:] = 0
    return jnp.asarray(seg)


def loss_and_grads(impl, q, k, v, cotangent, seg):
    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, impl=impl, q_segment_ids=seg, kv_segment_ids=seg,
                                              block_size=128, kv_block_size=128, interpret=True)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_matches_xla(q, k, v, cotangent, seg, atol):
    ref_out, ref_grads = loss_and_grads("xla", q, k, v, cotangent, seg)
    out, grads = loss_and_grads("splash", q, k, v, cotangent, seg)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    errors = {"out": float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))}
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=0, atol=atol)
    for name, ours, ref in zip("qkv", grads, ref_grads):
        ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
        assert np.abs(ref).max() > 0.1, name  # the gradient is not trivially zero
        errors[f"d{name}"] = float(np.abs(ours - ref).max())
        np.testing.assert_allclose(ours, ref, rtol=0, atol=atol * 10, err_msg=f"d{name}")
    print("max abs error vs xla:", errors)


@pytest.mark.parametrize("n_heads, n_kv_heads, with_segments",
                         [(4, 2, True), (4, 2, False), (4, 4, True), (4, 1, True)])  # GQA, MHA, MQA
def test_splash_outputs_and_gradients_equal_xla(n_heads, n_kv_heads, with_segments):
    """float32, T = 200 (padded to 256 inside); packed rows with a padding segment when with_segments."""
    q, k, v, cotangent = random_qkv(n=n_heads, k=n_kv_heads)
    assert_matches_xla(q, k, v, cotangent, packed_segments() if with_segments else None, atol=1e-5)


def test_splash_bfloat16_close_to_xla():
    """bfloat16 in and out (float32 scores inside both): the one extra rounding is the kernel's pre-scaled q, exact
    here (1/sqrt(64) = 1/8)."""
    q, k, v, cotangent = random_qkv(t=256, dtype=jnp.bfloat16)
    assert_matches_xla(q, k, v, cotangent, packed_segments(256), atol=2e-2)


def test_splash_block_sizes_pad_the_sequence_to_whole_blocks():
    assert attention.splash_block_sizes(200, 512, 512) == (256, 256, 256)  # blocks shrink to the padded sequence
    assert attention.splash_block_sizes(4095, 512, 1024) == (4096, 512, 1024)  # DPO/PPO feed T - 1 tokens
    assert attention.splash_block_sizes(600, 512, 256) == (1024, 512, 256)


@pytest.mark.slow  # ~40 s on 2 cores: four compiles of a sharded model's gradient, two with the interpreted kernel
@pytest.mark.parametrize("scan", [False, True])
def test_sharded_model_gradients_equal_xla(scan):
    """The whole model on a (data=2, fsdp=2, tensor=2) mesh of CPU devices, inside `activation_sharding`: splash
    runs under shard_map (batch over data/fsdp, query and KV heads over tensor); loss and parameter gradients equal
    those of "xla". Remat "minimal" recomputes the kernel in the backward pass."""
    cfg = LlamaConfig(vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256,
                      dtype="float32", scan_layers=scan, remat_policy="minimal", attention_block_size=128,
                      attention_kv_block_size=128, attention_interpret=True)
    mesh = sh.make_mesh(2, 2, 2, devices=jax.devices()[:8])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 160), 0, cfg.vocab_size)
    segments = jnp.concatenate([packed_segments(160), packed_segments(160)[::-1]])
    params = jax.jit(Llama(cfg).init)(jax.random.PRNGKey(0), tokens)["params"]

    def loss_and_grad(impl):
        model = Llama(cfg.replace(attention_impl=impl))
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens, segment_ids=segments) ** 2)  # noqa: E731
        return jax.jit(sh.with_activation_sharding(jax.value_and_grad(loss), mesh))(params)

    (ref_loss, ref_grads), (loss, grads) = loss_and_grad("xla"), loss_and_grad("splash")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    print("max abs parameter-gradient error vs xla:", worst)
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_splash_sharding_errors_are_one_line():
    """Three query heads cannot split over tensor=2: named before anything is traced into the kernel."""
    mesh = sh.make_mesh(1, 1, 2, devices=jax.devices()[:2])
    q = jnp.zeros((2, 128, 3, 64))
    k = jnp.zeros((2, 128, 1, 64))
    with sh.activation_sharding(mesh), pytest.raises(ValueError, match=r"^splash attention: 3 heads of the queries "
                                                                       r"do not divide over mesh axes \('tensor',\)"):
        attention.splash_attention(q, k, k, interpret=True)


def test_splash_on_cpu_without_interpret_is_a_one_line_config_error():
    from configs import tiny
    from llama2_jax.training import model_config

    config = tiny.get_config()
    config.model.attention_impl = "splash"
    with pytest.raises(checks.ConfigError, match=r"^config.model.attention_impl='splash' needs a TPU, but the JAX "
                                                 r"backend is 'cpu'; use --config.model.attention_impl=xla [^\n]*$"):
        model_config.resolve_model_config(config)
    config.model.attention_interpret = True
    assert model_config.resolve_model_config(config).attention_impl == "splash"


def test_splash_block_sizes_must_be_whole_lanes():
    with pytest.raises(ValueError, match=r"^LlamaConfig.attention_kv_block_size must be a multiple of 128 with "
                                         r"attention_impl='splash', got 200$"):
        LlamaConfig(attention_impl="splash", attention_kv_block_size=200)
    LlamaConfig(attention_impl="chunked", attention_block_size=200)  # any size for chunked
