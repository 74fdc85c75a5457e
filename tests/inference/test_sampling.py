"""Checks of the sampling arguments: one-line ValueErrors in the library, `error: ...` and exit 1 in the CLIs, all
before anything is loaded or compiled. (The token-choice distributions are tested in
tests/inference/test_generate.py.)"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.cli import chat as chat_cli
from llama2_jax.cli import common as cli_common
from llama2_jax.cli import generate as generate_cli
from llama2_jax.inference import generate as gen
from llama2_jax.inference import sampling
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=32,
                  dtype="float32")


@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0, 2.5])
@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 1.0])
def test_valid_arguments_pass(temperature, top_p):
    sampling.check_sampling(temperature, top_p)
    sampling.check_max_gen_len(0)
    sampling.check_max_gen_len(7)


@pytest.mark.parametrize("temperature", [-0.1, -1, math.nan])
def test_negative_temperature(temperature):
    with pytest.raises(ValueError, match=r"^temperature must be >= 0 \(0 = greedy\), got") as error:
        sampling.check_sampling(temperature, 0.9)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, math.nan])
def test_top_p_outside_zero_one(top_p):
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got") as error:
        sampling.check_sampling(0.6, top_p)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("max_gen_len", [-1, 2.5, True, "8"])
def test_bad_max_gen_len(max_gen_len):
    with pytest.raises(ValueError, match="^max_gen_len must be an integer >= 0, got"):
        sampling.check_max_gen_len(max_gen_len)


def test_host_api_checks_before_compiling():
    """`params` is None: a check that ran after padding or compiling would fail differently."""
    with pytest.raises(ValueError, match="^temperature must be >= 0"):
        gen.generate(None, CFG, [[1, 2]], max_gen_len=4, temperature=-1.0)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\]"):
        gen.generate_with_logprobs(None, CFG, [[1, 2]], max_gen_len=4, top_p=0.0)
    with pytest.raises(ValueError, match="^max_gen_len must be an integer >= 0"):
        gen.sample_lists(None, CFG, [[1, 2]], max_gen_len=-3)
    with pytest.raises(ValueError, match="^chunk must be an integer >= 1, got 0"):
        next(gen.stream_reply(None, CFG, None, [{"role": "user", "content": "hi"}], rng=0, max_gen_len=4, chunk=0))


CLI_BAD_FLAGS = [
    (["--max_gen_len=-1"], "error: --max_gen_len must be an integer >= 0, got -1"),
    (["--temperature=-0.5"], "error: --temperature must be >= 0 (0 = greedy), got -0.5"),
    (["--top_p=0"], "error: --top_p must be in (0, 1], got 0.0"),
    (["--top_p=1.5"], "error: --top_p must be in (0, 1], got 1.5"),
    (["--dtype=float16"], "error: --dtype must be one of float32, bfloat16, got 'float16'"),
]
MISSING = ["--checkpoint=/nonexistent/ckpt", "--tokenizer=/nonexistent/tokenizer.model"]


def run_cli(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback, and nothing loaded (the paths do not exist)
    return err


@pytest.mark.parametrize("flags,message", CLI_BAD_FLAGS)
def test_generate_cli_rejects_bad_flags(flags, message, capsys):
    assert run_cli(generate_cli.main, MISSING + ["--prompt=hi"] + flags, capsys) == message


@pytest.mark.parametrize("flags,message", CLI_BAD_FLAGS + [
    (["--chunk=0"], "error: --chunk must be >= 1, got 0"),  # chunk 0 would decode nothing, forever
    (["--chunk=-2"], "error: --chunk must be >= 1, got -2")])
def test_chat_cli_rejects_bad_flags(flags, message, capsys):
    assert run_cli(chat_cli.main, MISSING + flags, capsys) == message


@pytest.mark.parametrize("main,flags", [(generate_cli.main, ["--prompt=hi"]), (chat_cli.main, [])])
def test_missing_checkpoint_is_a_one_line_error(main, flags, capsys):
    err = run_cli(main, MISSING + flags, capsys)
    assert err.startswith("error: /nonexistent/ckpt/llama_config.json not found"), err


def test_dtype_default_follows_the_backend():
    args = generate_cli.parse_args(MISSING + ["--prompt=hi"])
    assert args.dtype == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    assert generate_cli.parse_args(MISSING + ["--prompt=hi", "--dtype=bfloat16"]).dtype == "bfloat16"
    assert chat_cli.parse_args(MISSING + ["--chunk=1"]).chunk == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_reads_weights_and_computes_in_dtype(dtype, tmp_path, llama_tokenizer_path):
    checkpoint = pytest.importorskip("llama2_jax.checkpoints.params_io")
    cfg = CFG.replace(scan_layers=False, vocab_size=32000)  # the tokenizer's vocabulary (load_model checks it)
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    checkpoint.save_params(tmp_path / "ckpt", params, cfg)
    loaded, loaded_cfg, tokenizer = cli_common.load_model(str(tmp_path / "ckpt"), str(llama_tokenizer_path), dtype)
    assert loaded_cfg.dtype == loaded_cfg.param_dtype == dtype and tokenizer.eos_id == 2
    assert {str(x.dtype) for x in jax.tree.leaves(loaded)} == {dtype}
    np.testing.assert_allclose(np.asarray(loaded["output"], np.float32), np.asarray(params["output"]),
                               rtol=2 ** -8 if dtype == "bfloat16" else 0)
