"""Flags and model loading shared by the generation and chat command lines (and train.gatt)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import jax

from llama2_jax.checkpoints.params_io import load_config, load_params
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_max_gen_len, check_sampling
from llama2_jax.text.tokenizer import Tokenizer, check_vocab

DTYPES = ("float32", "bfloat16")


def default_dtype() -> str:
    """float32 on CPU (exact, and XLA:CPU has no fast bfloat16 matmuls), bfloat16 on GPU/TPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --tokenizer, --max_gen_len, --temperature, --top_p, --seed, --dtype."""
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint dir or trainer workdir")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--max_gen_len", type=int, default=None, help="default: max_seq_len - 1")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--seed", type=int, default=1, help="Meta fixes the seed at 1")
    parser.add_argument("--dtype", default=None,
                        help=f"compute and weight dtype, one of {', '.join(DTYPES)} (default: float32 on CPU, "
                             "bfloat16 on GPU/TPU)")


def fail(message: str) -> NoReturn:
    """Print `error: message` to stderr and exit with status 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Exit with `error: --flag ...` unless max_gen_len >= 0, temperature >= 0, 0 < top_p <= 1 and --dtype is known;
    fills in the default dtype. Call before loading anything."""
    try:
        if args.max_gen_len is not None:
            check_max_gen_len(args.max_gen_len, name="--max_gen_len")
        check_sampling(args.temperature, args.top_p)
    except ValueError as error:
        fail(str(error) if str(error).startswith("--") else f"--{error}")
    if args.dtype is None:
        args.dtype = default_dtype()
    if args.dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")


def load_model(checkpoint: str, tokenizer_path: str, dtype: str | None = None):
    """(params on the device, LlamaConfig, Tokenizer) from a checkpoint dir and a tokenizer file. `dtype` (default
    `default_dtype()`) is both the compute dtype and the dtype the weights are read in. ValueError (before the
    weights are read) when the tokenizer's vocabulary is not the model's."""

    dtype = dtype or default_dtype()
    cfg = load_config(checkpoint).replace(dtype=dtype, param_dtype=dtype)
    tokenizer = Tokenizer(tokenizer_path)  # checked against the model before the weights are read
    check_vocab(tokenizer, cfg.vocab_size)
    params, cfg = load_params(checkpoint, cfg)
    return jax.device_put(params), cfg, tokenizer


def check_utf8(text: str, flag: str) -> None:
    """Exit with `error: FLAG ...` when a command-line string is not valid UTF-8 (Python keeps such bytes as lone
    surrogates, which the tokenizer cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        fail(f"{flag} is not valid UTF-8 text (byte {error.object[error.start].encode('utf-8', 'surrogateescape')!r} "
             f"at character {error.start})")


def load_model_or_exit(args: argparse.Namespace):
    """`load_model` for a command line: a missing or malformed checkpoint or tokenizer exits with `error: ...`."""
    try:
        return load_model(args.checkpoint, args.tokenizer, args.dtype)
    except (OSError, ValueError) as error:
        fail(str(error))


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for the trainers and the recipe (`app.run(main, flags_parser=...)`), with one change: an
    override of a field the config file lacks (`--config.lr=1`) is a one-line error, not ml_collections' traceback."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        # ml_collections' text: "'key'" (quoted once or twice), then maybe a line 'Did you mean "x" instead of "key"?'
        lines = str(error).strip("\"'").replace("\\n", "\n").split("\n")
        key = lines[0].strip("\\'\"")
        hint = next((line.strip(" \"'") for line in lines[1:] if line.startswith("Did you mean")), "")
        override = next((arg.split("=")[0] for arg in argv[1:]
                         if arg.startswith("--config.") and key in arg.split("=")[0].split(".")), None)
        if override is None:  # not an override's missing field: some other failure, shown as it is
            raise
        path = next((arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")), "the config file")
        fail(f"{override}: {path} has no field {key!r}" + (f" ({hint})" if hint else ""))
