"""One model served across devices (--mesh.data / --mesh.tensor) on the 8 simulated CPU devices of tests/conftest.py
(XLA_FLAGS=--xla_force_host_platform_device_count=8): the weights sharded by the trainers' rules, the slots' KV cache
over data and tensor; every completion equals the one-device engine's token for token (greedy, sampled, n > 1, with
the prefix cache and with int8 weights), and a mesh that does not divide the model is one line before loading."""

import jax
import numpy as np
import pytest
from helpers.serving import MODEL_CFG, N_SLOTS, complete, served  # noqa: F401  (the module's server)

from llama2_jax.model import sharding as sh
from llama2_jax.serve.engine import Engine

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def mesh_engine(served):
    _, params, tokenizer, _ = served
    engine = Engine(params, MODEL_CFG, tokenizer, n_slots=N_SLOTS, max_queue=64, prefix_blocks=8, prefix_block=4,
                    mesh=sh.make_mesh(data=4, fsdp=1, tensor=2))
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop()


def prompts(n: int = 6) -> list[list[int]]:
    rng = np.random.default_rng(3)
    shared = [1] + rng.integers(3, 32000, size=11).tolist()
    return [shared + rng.integers(3, 32000, size=int(k)).tolist() for k in rng.integers(1, 12, size=n)]


@pytest.mark.slow
def test_the_sharded_engine_equals_the_one_device_engine(served, mesh_engine):
    plain = served[3]
    for fields in ({}, dict(temperature=1.0, top_p=0.9, seed=7), dict(n=3, temperature=0.8, seed=2)):
        got, expected = complete(mesh_engine, prompts(), **fields), complete(plain, prompts(), **fields)
        assert [f.tokens for f in got] == [f.tokens for f in expected], fields
        np.testing.assert_allclose([e.logprob for f in got for e in f.logprobs],
                                   [e.logprob for f in expected for e in f.logprobs], atol=1e-4)
    assert mesh_engine.prefix.hit_tokens > 0  # the later rounds came from the sharded prefix cache
    layer = mesh_engine.params["layers_0"]["attention"]["wq"]
    assert layer.sharding.spec == sh.logical_to_spec((sh.EMBED, sh.HEADS, sh.HEAD_DIM))
    assert len(mesh_engine.state.cache[0]["k"].sharding.device_set) == 8


@pytest.mark.slow
def test_int8_on_the_mesh_equals_int8_on_one_device(served):
    _, params, tokenizer, _ = served
    one = Engine(params, MODEL_CFG, tokenizer, n_slots=N_SLOTS, quantize="int8")
    many = Engine(params, MODEL_CFG, tokenizer, n_slots=N_SLOTS, quantize="int8",
                  mesh=sh.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4]))
    assert many.params["output"]["scale"].sharding.spec == sh.logical_to_spec((None, sh.VOCAB))
    for engine in (one, many):
        engine.start()
    try:
        got, expected = complete(many, prompts(3)), complete(one, prompts(3))
    finally:
        one.stop()
        many.stop()
    assert [f.tokens for f in got] == [f.tokens for f in expected]


def test_mesh_flags_are_checked_before_serving(served, tmp_path, capsys):
    from conftest import shared_file

    from llama2_jax.checkpoints import params_io
    from llama2_jax.cli import serve as serve_cli

    params_io.save_params(tmp_path / "ckpt", served[1], MODEL_CFG)
    base = [f"--checkpoint={tmp_path / 'ckpt'}", f"--tokenizer={shared_file('llama2-tokenizer.model')}",
            "--max_batch=16"]
    engine = serve_cli.make_engine(serve_cli.parse_args(base + ["--mesh.data=4", "--mesh.tensor=2"]))
    assert dict(engine.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    for flags, message in [(["--mesh.tensor=3"], "needs 3 devices but 8 are available"),
                           (["--mesh.tensor=4", "--mesh.data=2"], "2 KV heads are not divisible by --mesh.tensor=4"),
                           (["--mesh.data=8", "--max_batch=12"], "--max_batch 12 is not divisible")]:
        with pytest.raises(SystemExit):
            serve_cli.make_engine(serve_cli.parse_args(base + flags))
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
