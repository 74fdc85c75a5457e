"""`python -m llama2_jax.serve`: an OpenAI-compatible HTTP server with continuous batching.

  python -m llama2_jax.serve --checkpoint=DIR --tokenizer=FILE [--host=127.0.0.1 --port=8000 --max_batch=16
      --max_seq_len=N --dtype=float32 --model_name=llama2_jax --max_queue=64 --api_key=KEY ...
      --mesh.tensor=N --mesh.data=N --quantize=int8 --prefix_cache_mb=MB --grace_period=S --max_body_bytes=N]

Every program (prefill per prompt bucket, insert, the decode step) is compiled before the server listens, so it
answers /health only once it can serve. SIGTERM stops accepting, finishes the in-flight requests (for at most
--grace_period seconds), then exits.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from typing import Optional, Sequence

from llama2_jax.cli.common import DTYPES, default_dtype, fail, load_model_or_exit
from llama2_jax.model import sharding as sh
from llama2_jax.serve.guard import KEYS_ENV, MAX_BODY_BYTES, is_loopback, read_key_file
from llama2_jax.text.tokenizer import check_vocab


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags, checked before anything is loaded (`error: ...` and exit 1 on a bad value)."""
    parser = argparse.ArgumentParser(prog="python -m llama2_jax.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint dir or trainer workdir")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch", type=int, default=16, help="decode slots (requests decoded together)")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="tokens per request, prompt + completion (default: the model's max_seq_len)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a slot; more get HTTP 429")
    parser.add_argument("--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: float32 on CPU, "
                                                      "bfloat16 on GPU/TPU)")
    parser.add_argument("--model_name", default="llama2_jax", help="the model id of /v1/models and requests")
    parser.add_argument("--api_key", action="append", default=[],
                        help=f"a key clients must send as 'Authorization: Bearer KEY' (repeat for several; or the "
                             f"environment variable {KEYS_ENV}=FILE, one key a line); /health stays open")
    for axis, meaning in (("data", "replicas of the model, the decode slots split over them"),
                          ("fsdp", "the model dim of the weights split over them"),
                          ("tensor", "attention heads, MLP and vocabulary split over them (tensor parallel)")):
        parser.add_argument(f"--mesh.{axis}", dest=f"mesh_{axis}", type=int, default=1,
                            help=f"devices on the mesh's {axis} axis: {meaning} (all 1: one device, no mesh)")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                        help="int8: matmul weights stored as int8 with a scale per output channel (weight-only)")
    parser.add_argument("--prefix_cache_mb", type=float, default=0.0,
                        help="memory for the KV of shared prompt prefixes (system prompts, few-shot examples), "
                             "reused by later requests, least recently used evicted first; 0: no prefix cache")
    parser.add_argument("--prefix_block", type=int, default=16, help="tokens per prefix-cache block")
    parser.add_argument("--grace_period", type=float, default=30.0,
                        help="seconds that SIGTERM waits for in-flight requests before cutting them off")
    parser.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES,
                        help="larger request bodies are refused with HTTP 413 before they are read")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        fail(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        fail(f"--max_batch must be >= 1, got {args.max_batch}")
    if not args.prefix_cache_mb >= 0:
        fail(f"--prefix_cache_mb must be >= 0, got {args.prefix_cache_mb}")
    if args.prefix_block < 1:
        fail(f"--prefix_block must be >= 1, got {args.prefix_block}")
    if not args.grace_period >= 0:
        fail(f"--grace_period must be >= 0 seconds, got {args.grace_period}")
    if args.max_body_bytes < 1:
        fail(f"--max_body_bytes must be >= 1, got {args.max_body_bytes}")
    if args.max_queue < 1:
        fail(f"--max_queue must be >= 1, got {args.max_queue}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        fail(f"--max_seq_len must be >= 2, got {args.max_seq_len}")
    args.api_keys = api_keys(args.api_key, os.environ.get(KEYS_ENV))
    args.dtype = args.dtype or default_dtype()
    if args.dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    return args


def api_keys(flag_keys: list[str], key_file: Optional[str]) -> list[str]:
    """The keys of --api_key and of the LLAMA2_JAX_API_KEYS file, together (exits on a bad file or an empty key)."""
    if any(not key.strip() or any(c.isspace() for c in key) for key in flag_keys):
        fail("--api_key must be a non-empty key without whitespace")
    keys = list(flag_keys)
    if key_file:
        try:
            keys += read_key_file(key_file)
        except ValueError as error:
            fail(str(error))
    return keys


def exposure_warning(host: str, keys: list[str]) -> Optional[str]:
    """The warning for a server that anyone on the network can use (a non-loopback address without keys)."""
    if keys or is_loopback(host):
        return None
    return (f"warning: serving on {host} without API keys: anyone who can reach this port can use the model "
            f"(set --api_key or {KEYS_ENV})")


def make_engine(args: argparse.Namespace):
    """Load the model and build the engine (exits with `error: ...` on a bad checkpoint, tokenizer or length)."""
    from llama2_jax.serve.engine import Engine, kv_bytes_per_token, prefix_pool_blocks

    params, cfg, tokenizer = load_model_or_exit(args)
    try:
        check_vocab(tokenizer, cfg.vocab_size)
    except ValueError as error:
        fail(str(error))
    if args.max_seq_len is not None and args.max_seq_len > cfg.max_seq_len:
        fail(f"--max_seq_len {args.max_seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    mesh = None
    if (args.mesh_data, args.mesh_fsdp, args.mesh_tensor) != (1, 1, 1):
        try:
            mesh = sh.make_mesh(args.mesh_data, args.mesh_fsdp, args.mesh_tensor)
        except ValueError as error:
            fail(f"--mesh.data/--mesh.fsdp/--mesh.tensor: {error}")
    blocks = prefix_pool_blocks(cfg, args.prefix_cache_mb, args.prefix_block)
    if args.prefix_cache_mb and not blocks:
        fail(f"--prefix_cache_mb {args.prefix_cache_mb} holds no block of --prefix_block {args.prefix_block} tokens "
             f"({kv_bytes_per_token(cfg) * args.prefix_block} bytes)")
    try:
        return Engine(params, cfg, tokenizer, n_slots=args.max_batch, max_len=args.max_seq_len,
                      max_queue=args.max_queue, prefix_blocks=blocks, prefix_block=args.prefix_block,
                      quantize=None if args.quantize == "none" else args.quantize, mesh=mesh)
    except ValueError as error:  # the mesh does not divide the model or the slots
        fail(str(error))


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything is loaded or compiled, so that a port in use is reported at once
    (uvicorn listens on it later). SO_REUSEADDR as uvicorn's own bind: a port in TIME_WAIT can be reused, one that a
    process listens on cannot."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = "the address is already in use" if error.errno == errno.EADDRINUSE else error.strerror or error
        fail(f"cannot listen on {host}:{port}: {reason}")
    except (socket.gaierror, UnicodeError) as error:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {error}")
    return sock


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from llama2_jax.serve.api import create_app
    except ImportError as error:
        fail(f"{error.name} is missing: install the serve extra (pip install -e '.[serve]')")
    sock = bind(args.host, args.port)
    warning = exposure_warning(args.host, args.api_keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    engine = make_engine(args)
    buckets = engine.warm_up()
    port = sock.getsockname()[1]
    print(f"compiled {buckets} prompt buckets ({', '.join(map(str, engine.buckets))} tokens) for {engine.n_slots} "
          f"slots of {engine.max_len} tokens; {engine.memory_line()}; serving {args.model_name} on "
          f"http://{args.host}:{port}", flush=True)
    # after SIGTERM uvicorn stops accepting, waits up to --grace_period for the open requests, then cancels them
    # (their slots are freed) and the app's shutdown stops the engine
    app = create_app(engine, args.model_name, api_keys=args.api_keys, max_body_bytes=args.max_body_bytes,
                     grace_period=args.grace_period)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.grace_period)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
