"""int8 weight-only serving: kernels quantized per output channel as the formula says, logits within a stated
tolerance of the unquantized model on a fixed prompt set (greedy agreement reported), the int8 engine's greedy
output equal to the full forward pass of the dequantized weights, and the weights' memory a quarter.

Covers llama2_jax.serve.quantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import init_params
from helpers.serving import MODEL_CFG

from llama2_jax.inference import decode
from llama2_jax.serve import quantize
from llama2_jax.serve.engine import Engine, Finished, Request

LOGIT_TOLERANCE = 0.1  # max |logit(int8) - logit| / std(logit) on the fixed prompt set (measured 0.065)
GREEDY_AGREEMENT = 0.95  # argmax agreement over its positions (measured 0.984)


def forward_logits(params, tokens):
    view = decode.layer_params(quantize.weights_view(params, MODEL_CFG), MODEL_CFG)
    caches = decode.init_layer_caches(MODEL_CFG, tokens.shape[0], tokens.shape[1])
    hidden, _ = decode.decode_forward(view, MODEL_CFG, tokens, caches, jnp.zeros((), jnp.int32))
    return decode.project_logits(view, hidden)


forward_logits_jit = jax.jit(forward_logits)


@pytest.fixture(scope="module")
def params():
    return decode.layer_params(init_params(MODEL_CFG, seed=3), MODEL_CFG)


def test_kernels_are_quantized_per_output_channel(params):
    q = quantize.quantize_params(params)
    for name, axes in [("wq", (0,)), ("wo", (0, 1)), ("w2", (0,))]:
        group = "attention" if name.startswith("wq") or name == "wo" else "feed_forward"
        w, packed = np.asarray(params["layers_1"][group][name]), q["layers_1"][group][name]
        scale = np.max(np.abs(w), axis=axes, keepdims=True) / 127
        np.testing.assert_allclose(packed["scale"], scale, rtol=1e-6)
        assert packed["int8"].dtype == np.int8 and np.abs(packed["int8"]).max() == 127
        assert np.all(np.abs(packed["int8"] * packed["scale"] - w) <= scale / 2 + 1e-7)
    assert quantize.is_quantized(q["output"]) and q["output"]["scale"].shape == (1, MODEL_CFG.vocab_size)
    assert not quantize.is_quantized(q["tok_embeddings"]["embedding"])  # a gather: kept as is
    assert q["norm"]["scale"].dtype == np.float32


def test_int8_logits_are_within_the_stated_tolerance(params):
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, MODEL_CFG.vocab_size, size=(8, 32)))
    exact = np.asarray(forward_logits_jit(params, tokens))
    int8 = np.asarray(forward_logits_jit(quantize.quantize_params(params), tokens))
    assert np.abs(int8 - exact).max() / exact.std() < LOGIT_TOLERANCE
    assert (int8.argmax(-1) == exact.argmax(-1)).mean() >= GREEDY_AGREEMENT


def test_the_int8_engine_decodes_the_dequantized_model(params, llama_tokenizer_path):
    from llama2_jax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(llama_tokenizer_path)
    engine = Engine(params, MODEL_CFG, tokenizer, n_slots=2, quantize="int8")
    dequantized = quantize.dequantize(engine.params, jnp.float32)
    prompt, events = tokenizer.encode("Once upon a time", bos=True), []
    engine.start()
    engine.submit(Request(prompt=prompt, max_tokens=8, emit=events.append, temperature=0))
    engine.stop(timeout=120)
    finished = [e for e in events if isinstance(e, Finished)][0]
    tokens = list(prompt)
    for _ in range(8):
        logits = forward_logits_jit(dequantized, jnp.asarray([tokens]))
        tokens.append(int(np.argmax(logits[0, -1])))
    assert finished.tokens == tokens[len(prompt):]
    weights = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    embedding = params["tok_embeddings"]["embedding"].size * 4
    assert weights(engine.params) - embedding < 0.27 * (weights(params) - embedding)
    assert "(int8 kernels)" in engine.memory_line()
    with pytest.raises(ValueError):
        Engine(params, MODEL_CFG, tokenizer, quantize="int4")
