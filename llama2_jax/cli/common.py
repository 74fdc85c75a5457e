"""Flags and model loading shared by the generation and chat command lines (and train.gatt)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

import jax

from llama2_jax.checkpoints.params_io import load_config, load_params
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_max_gen_len, check_sampling
from llama2_jax.text.tokenizer import Tokenizer, check_vocab
from llama2_jax.training.checks import config_load_error

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


def _config_path(argv: list[str]) -> str:
    """The --config file of a command line ("" when absent), without ml_collections' ":ARG" suffix."""
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1].split(":")[0]
    return ""


def _config_file_line(error: BaseException, path: str) -> str:
    """"FILE:LINE" of the config file where `error` was raised (a SyntaxError names it itself), or ""."""
    if not path:
        return ""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for the trainers and the recipe (`app.run(main, flags_parser=...)`), with one-line errors
    instead of ml_collections' tracebacks: an override of a field the config file lacks (`--config.lr=1`), a missing
    or unreadable --config file (met while applying an override), and an error in the config file itself (a
    SyntaxError, or an exception its code raises: FILE:LINE and the error)."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except OSError as error:  # "Failed loading config file ...": its last line names the file and the cause
        fail(config_load_error(error))
    except Exception as error:  # noqa: BLE001 - only what the config file raised is shown as one line
        where = _config_file_line(error, _config_path(argv))
        if where:
            text = error.msg if isinstance(error, SyntaxError) else (str(error).strip().splitlines() or [""])[0]
            fail(f"--config: {where}: {type(error).__name__}: {text}")
        missing = _missing_field(error, argv) if isinstance(error, (AttributeError, KeyError)) else ""
        if not missing:  # some other failure, shown as it is
            raise
        fail(missing)


def _missing_field(error: BaseException, argv: list[str]) -> str:
    """The line for `--config.X=V` when the config has no field X (with ml_collections' hint), or "" when `error` is
    not about an override's field."""
    # ml_collections' text: "'key'" (quoted once or twice), then maybe a line 'Did you mean "x" instead of "key"?'
    lines = str(error).strip("\"'").replace("\\n", "\n").split("\n")
    key = lines[0].strip("\\'\"")
    hint = next((line.strip(" \"'") for line in lines[1:] if line.startswith("Did you mean")), "")
    override = next((arg.split("=")[0] for arg in argv[1:]
                     if arg.startswith("--config.") and key in arg.split("=")[0].split(".")), None)
    if override is None:
        return ""
    path = next((arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")), "the config file")
    return f"{override}: {path} has no field {key!r}" + (f" ({hint})" if hint else "")
