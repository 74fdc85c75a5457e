"""Serving throughput: N concurrent `openai` clients against llama2_jax.serve on 127.0.0.1, next to the same requests
sent one at a time, in the same run (same server, same compiled programs, same machine load).

The server runs in this process (uvicorn in a thread) on random weights of the chosen shape (benchmarks/generate.py's
SHAPES); the requests have mixed prompt lengths (token-id prompts) and mixed max_tokens, decoded greedily. One line:
aggregate completion tokens/s and p50/p99 request latency for both phases, how many requests were answered, and the
median time of one decode-slot step (serve.programs.step over all slots). A second line: requests sharing a
--shared_prompt-token system prompt (distinct suffixes, streamed), time to first token and throughput without and
with the prefix cache. A third line: int8 weight-only against the same weights (memory, step time, logit error and
greedy agreement on a fixed prompt set).

  python benchmarks/serve.py --tokenizer=/path/to/tokenizer.model --shape=15m --clients=16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from generate import SHAPES, device_name, random_params  # benchmarks/generate.py

from llama2_jax.inference import decode, slots
from llama2_jax.serve import programs
from llama2_jax.serve.api import create_app
from llama2_jax.serve.engine import Engine, prefix_pool_blocks
from llama2_jax.serve.quantize import weights_view
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
    """Median milliseconds of one decode step over all of the engine's slots (fresh slots, so nothing is served)."""
    state = slots.init_slots(engine.cfg, engine.n_slots, engine.max_len, jax.random.PRNGKey(0), logprobs=True,
                              n_top=engine.state.logprobs.top_ids.shape[-1])
    controls = programs.init_controls(engine.n_slots, engine.cfg.vocab_size)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, controls = programs.step_jit(engine.params, engine.cfg, state, controls)
        jax.block_until_ready(state.tokens)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[1:]))


def streamed_phase(client, requests, workers: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request time to first token, completion tokens) with `workers` concurrent streaming
    clients; the time to first token is measured to the first chunk that carries text."""
    def one(request):
        prompt, max_tokens = request
        start, first = time.perf_counter(), None
        stream = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        tokens = 0
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return first if first is not None else time.perf_counter() - start, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, requests))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def int8_line(engine: Engine, args) -> str:
    """int8 weight-only against the engine's own weights: their memory, the decode-slot step time, and on a fixed
    prompt set (8 random prompts of 64 tokens) the largest logit difference over the logits' standard deviation and
    the greedy (argmax) agreement over every position."""
    cfg = engine.cfg
    int8 = Engine(engine.params, cfg, engine.tokenizer, n_slots=engine.n_slots, max_len=engine.max_len,
                  quantize="int8")

    def forward(params, tokens):
        view = decode.layer_params(weights_view(params, cfg), cfg)
        caches = decode.init_layer_caches(cfg, tokens.shape[0], tokens.shape[1])
        hidden, _ = decode.decode_forward(view, cfg, tokens, caches, jnp.zeros((), jnp.int32))
        return decode.project_logits(view, hidden)

    forward = jax.jit(forward)
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, size=(8, min(64, engine.max_len))))
    exact, quantized = np.asarray(forward(engine.params, tokens)), np.asarray(forward(int8.params, tokens))
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)) / 2 ** 20
    return (f"int8: weights {size(engine.params):.1f} -> {size(int8.params):.1f} MiB | slot_step "
            f"{slot_step_ms(engine):.2f} -> {slot_step_ms(int8):.2f} ms | logits max|d|/std="
            f"{np.abs(quantized - exact).max() / exact.std():.3f} greedy_agreement="
            f"{(quantized.argmax(-1) == exact.argmax(-1)).mean():.3f} over {tokens.size} positions")


def prefix_line(params, cfg, tokenizer, args) -> str:
    """Time to first token and throughput of requests that share a --shared_prompt-token system prompt (distinct
    suffixes), served without and with the prefix cache, one after the other in this run."""
    import openai

    rng = np.random.default_rng(1)
    shared = [1] + rng.integers(3, cfg.vocab_size, size=args.shared_prompt - 1).tolist()
    n = args.requests or 2 * args.clients
    requests = [(shared + rng.integers(3, cfg.vocab_size, size=int(rng.integers(8, 64))).tolist(),
                 int(rng.integers(16, 48))) for _ in range(n)]
    max_len = args.shared_prompt + 64 + 48
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len))
    out = {}
    for name, megabytes in (("off", 0), ("on", args.prefix_cache_mb)):
        blocks = prefix_pool_blocks(cfg, megabytes, 16) if megabytes else 0
        engine = Engine(params, cfg, tokenizer, n_slots=args.clients, max_len=max_len,
                        max_queue=max(64, 2 * args.clients), prefix_blocks=blocks)
        engine.warm_up()
        server, url = start_server(engine)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        streamed_phase(client, requests[:2], 1)  # warm the HTTP path (and, with the cache, the shared prompt)
        wall, ttft, tokens = streamed_phase(client, requests, args.clients)
        hit = engine.prefix.hit_tokens / engine.prefix.lookup_tokens if engine.prefix else 0.0
        out[name] = (tokens / wall, float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)), hit)
        server.should_exit = True
        time.sleep(0.5)
    (off_tps, off_p50, off_p99, _), (on_tps, on_p50, on_p99, hit) = out["off"], out["on"]
    return (f"prefix_cache: shared={args.shared_prompt} suffix=8..63 max_tokens=16..47 requests={n} "
            f"clients={args.clients} cache={args.prefix_cache_mb}MiB | off: ttft p50={off_p50:.3f}s "
            f"p99={off_p99:.3f}s {off_tps:.1f} tok/s | on: ttft p50={on_p50:.3f}s p99={on_p99:.3f}s {on_tps:.1f} "
            f"tok/s hit_rate={hit:.2f} | ttft x{off_p50 / on_p50:.2f} throughput x{on_tps / off_tps:.2f}")


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
    parser.add_argument("--shared_prompt", type=int, default=512,
                        help="prefix-cache line: tokens of the system prompt every request shares (0: no line)")
    parser.add_argument("--prefix_cache_mb", type=float, default=256, help="prefix-cache line: the cache's memory")
    args = parser.parse_args(argv)
    cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.dtype, max_seq_len=args.max_seq_len)
    cfg = cfg.replace(n_layers=args.n_layers) if args.n_layers else cfg
    prompt_range = tuple(int(x) for x in args.prompt_len.split(","))
    output_range = tuple(int(x) for x in args.max_tokens.split(","))
    if prompt_range[1] + output_range[1] > args.max_seq_len + 2:
        raise SystemExit(f"error: --prompt_len and --max_tokens ranges exceed --max_seq_len {args.max_seq_len}")
    params, tokenizer = random_params(cfg), Tokenizer(args.tokenizer)
    engine = Engine(params, cfg, tokenizer, n_slots=args.clients, max_queue=max(64, 2 * args.clients))
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
          f"tokens={many_tokens}/{one_tokens} slot_step={step:.2f}ms", flush=True)
    print(int8_line(engine, args), flush=True)
    if args.shared_prompt:
        print(prefix_line(params, cfg, tokenizer, args), flush=True)


if __name__ == "__main__":
    main()
