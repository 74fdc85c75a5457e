"""The "chunked" attention kernel: outputs and gradients equal the reference "xla" kernel's, and its backward pass
keeps no [B, N, T, S] tensor.

Covers llama2_jax.model.attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model import attention
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama


def random_qkv(b=2, t=13, n=6, k=2, h=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
            jax.random.normal(keys[2], (b, t, k, h)), jax.random.normal(keys[3], (b, t, n, h)))


# 13 tokens: three documents and padding in row 0, one document in row 1
PACKED = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0, 0], [1] * 13])


def loss_and_grads(impl, q, k, v, cotangent, seg, block_size):
    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, impl=impl, q_segment_ids=seg, kv_segment_ids=seg,
                                              block_size=block_size)
        return jnp.sum(out * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("block_size", [4, 5, 13, 64])  # 13 tokens: padded last block, exact, one block, T < block
@pytest.mark.parametrize("with_segments", [False, True])
def test_chunked_outputs_and_gradients_equal_xla(block_size, with_segments):
    q, k, v, cotangent = random_qkv()
    seg = PACKED if with_segments else None
    ref_out, ref_grads = loss_and_grads("xla", q, k, v, cotangent, seg, block_size)
    out, grads = loss_and_grads("chunked", q, k, v, cotangent, seg, block_size)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, ours, ref in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(ref).max()) > 0.1, name  # the gradient is not trivially zero
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_chunked_bfloat16_equals_xla_bfloat16():
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in random_qkv(t=16))
    run = jax.jit(attention.dot_product_attention, static_argnames=("impl", "block_size"))
    ref = run(q, k, v, impl="xla")
    out = run(q, k, v, impl="chunked", block_size=4)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


@pytest.mark.slow  # ~35 s on a loaded 2-core CPU: two compiles of a scanned, rematerialised model's gradient
def test_model_gradients_equal_with_chunked_attention():
    """The whole model (scanned, remat "minimal", packed rows): parameter gradients of "chunked" == "xla"."""
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16,
                      dtype="float32", scan_layers=True, remat_policy="minimal", attention_block_size=3)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 13), 0, cfg.vocab_size)
    params = jax.jit(Llama(cfg).init)(jax.random.PRNGKey(0), tokens)["params"]

    def grads(impl):
        model = Llama(cfg.replace(attention_impl=impl))
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens, segment_ids=PACKED) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for ours, ref in zip(jax.tree.leaves(grads("chunked")), jax.tree.leaves(grads("xla"))):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_chunked_backward_keeps_no_full_score_matrix():
    """XLA's temp memory of the gradient: the reference holds several float32 [B, N, T, T] tensors (8 MiB each
    here), chunked only [B, N, block, T] ones."""
    b, t, n, h, block = 1, 512, 8, 16, 64
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, 2, h), jnp.float32)

    def temp_bytes(impl):
        loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl=impl,  # noqa: E731
                                                                       block_size=block))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    score_matrix = b * n * t * t * 4
    assert temp_bytes("xla") >= 2 * score_matrix
    assert temp_bytes("chunked") < score_matrix


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="attention_block_size"):
        LlamaConfig(attention_block_size=0)
    with pytest.raises(ValueError, match="attention_impl"):
        LlamaConfig(attention_impl="flash")
