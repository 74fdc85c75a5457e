"""Serving throughput: N concurrent `openai` clients against llama2_jax.serve on 127.0.0.1, next to the same requests
sent one at a time, in the same run (same server, same compiled programs, same machine load).

The server runs in this process (uvicorn in a thread) on random weights of the chosen shape (benchmarks/generate.py's
SHAPES); the requests have mixed prompt lengths (token-id prompts) and mixed max_tokens, decoded greedily. One line:
aggregate completion tokens/s and p50/p99 request latency for both phases, how many requests were answered, and the
median time of one decode-slot step (decode.generate_step over all slots).

  python benchmarks/serve.py --tokenizer=/path/to/tokenizer.model --shape=15m --clients=16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import threading
import time

import jax
import numpy as np
from generate import SHAPES, device_name, random_params  # benchmarks/generate.py

from llama2_jax.inference import decode
from llama2_jax.serve.api import create_app
from llama2_jax.serve.engine import Engine
from llama2_jax.text.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: Engine):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def make_requests(n: int, vocab: int, seed: int, prompt_range, output_range) -> list[tuple[list[int], int]]:
    """n (prompt token ids, max_tokens) pairs with lengths drawn uniformly from the ranges."""
    rng = np.random.default_rng(seed)
    return [([1] + rng.integers(3, vocab, size=int(rng.integers(*prompt_range)) - 1).tolist(),
             int(rng.integers(*output_range))) for _ in range(n)]


def run_phase(client, requests, workers: int) -> tuple[float, list[float], int, int]:
    """(wall seconds, per-request latencies, completion tokens, answered) with `workers` concurrent clients."""
    def one(request):
        prompt, max_tokens = request
        start = time.perf_counter()
        out = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results), len(results)


def slot_step_ms(engine: Engine, repeats: int = 20) -> float:
    """Median milliseconds of one decode step over all of the engine's slots (a fresh state, so nothing is served)."""
    state = engine._fresh_state()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state = decode.generate_step_jit(engine.params, engine.cfg, state)
        jax.block_until_ready(state.tokens)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[1:]))


def main(argv=None) -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="SentencePiece model with the shape's vocabulary")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="15m")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (and decode slots)")
    parser.add_argument("--requests", type=int, default=None, help="default: 2 x clients")
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--prompt_len", default="8,96", help="prompt lengths drawn from [lo, hi)")
    parser.add_argument("--max_tokens", default="16,128", help="max_tokens drawn from [lo, hi)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--n_layers", type=int, default=None, help="override the shape's depth (smoke tests)")
    args = parser.parse_args(argv)
    cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.dtype, max_seq_len=args.max_seq_len)
    cfg = cfg.replace(n_layers=args.n_layers) if args.n_layers else cfg
    prompt_range = tuple(int(x) for x in args.prompt_len.split(","))
    output_range = tuple(int(x) for x in args.max_tokens.split(","))
    if prompt_range[1] + output_range[1] > args.max_seq_len + 2:
        raise SystemExit(f"error: --prompt_len and --max_tokens ranges exceed --max_seq_len {args.max_seq_len}")
    engine = Engine(random_params(cfg), cfg, Tokenizer(args.tokenizer), n_slots=args.clients,
                    max_queue=max(64, 2 * args.clients))
    engine.warm_up()
    server, url = start_server(engine)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    requests = make_requests(args.requests or 2 * args.clients, cfg.vocab_size, 0, prompt_range, output_range)
    run_phase(client, requests[:2], 1)  # warm the HTTP path
    one_wall, one_lat, one_tokens, one_answered = run_phase(client, requests, 1)
    many_wall, many_lat, many_tokens, many_answered = run_phase(client, requests, args.clients)
    step = slot_step_ms(engine)
    server.should_exit = True
    pct = lambda lat, q: float(np.percentile(lat, q))
    print(f"device={device_name()} model={args.shape}/{args.dtype} clients={args.clients} requests={len(requests)} "
          f"prompt={args.prompt_len} max_tokens={args.max_tokens} | one_at_a_time={one_tokens / one_wall:.1f} tok/s "
          f"p50={pct(one_lat, 50):.3f}s p99={pct(one_lat, 99):.3f}s | concurrent={many_tokens / many_wall:.1f} tok/s "
          f"p50={pct(many_lat, 50):.3f}s p99={pct(many_lat, 99):.3f}s | speedup="
          f"{(many_tokens / many_wall) / (one_tokens / one_wall):.2f}x answered={many_answered}/{len(requests)} "
          f"tokens={many_tokens}/{one_tokens} slot_step={step:.2f}ms")


if __name__ == "__main__":
    main()
