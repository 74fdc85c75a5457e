"""Operations: /metrics in Prometheus' text format, a client that goes away frees its slot at once (streaming or
not), a shutdown's grace period, and a bounded load test (64 concurrent clients on 127.0.0.1, streaming and not, some
leaving early: every other request answered in full, no slot leaks, memory flat across two identical waves).

Covers llama2_jax.serve.metrics."""

import concurrent.futures
import gc
import json
import logging
import re
import time

import jax
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from helpers.serving import MODEL_CFG, Records, served  # noqa: E402,F401  (the module's server)

from llama2_jax.serve import engine as engine_module  # noqa: E402
from llama2_jax.serve.engine import SHUTDOWN_ERROR, Engine, Finished, Piece, Request  # noqa: E402

SAMPLE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+$|^.* \+?Inf$')


def scrape(url: str) -> dict[str, float]:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) llama2_jax_[a-z_]+ ", line), line
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_metrics_count_requests_tokens_and_latencies(served):
    url, _, tokenizer, _ = served
    before = scrape(url)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "n": 2}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
    assert httpx.post(url + "/v1/completions", json=dict(body, max_tokens=0)).status_code == 400
    after = scrape(url)
    ok, bad = ('llama2_jax_requests_total{endpoint="/v1/completions",status="200"}',
               'llama2_jax_requests_total{endpoint="/v1/completions",status="400"}')
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    prompt_tokens = len(tokenizer.encode("Once upon a time", bos=True))
    assert after["llama2_jax_prompt_tokens_total"] == before["llama2_jax_prompt_tokens_total"] + prompt_tokens
    assert after["llama2_jax_completion_tokens_total"] == before["llama2_jax_completion_tokens_total"] + 10
    first = "llama2_jax_time_to_first_token_seconds_count"
    assert after[first] == before[first] + 2
    per_token = "llama2_jax_time_per_output_token_seconds_count"
    assert after[per_token] == before[per_token] + 8
    assert after['llama2_jax_time_to_first_token_seconds_bucket{le="+Inf"}'] == after[first]
    assert after["llama2_jax_active_slots"] == 0 and after["llama2_jax_queue_depth"] == 0
    assert after["llama2_jax_slots"] == 16


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes >= 50 ms, so that requests are still decoding when a client leaves."""
    step = engine_module.programs.step_jit

    def slow_step(*args, **kwargs):
        time.sleep(0.05)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine_module.programs, "step_jit", slow_step)


def wait_for(condition, seconds: float) -> float:
    """Seconds until condition() holds (fails after `seconds`)."""
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < seconds, "timed out"
        time.sleep(0.005)
    return time.perf_counter() - start


def test_a_client_that_leaves_a_whole_response_frees_its_slot_at_once(served, slow_steps):
    url, _, _, engine = served
    before = engine.cancelled
    records = Records()
    logging.getLogger("uvicorn.error").addHandler(records)
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 25, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
        # the connection is closed when the client gives up; the slot is freed at the next step (50 ms here), not
        # after a polling interval or the 25 tokens
        assert wait_for(lambda: engine.cancelled == before + 1 and engine.load()["active"] == 0, 2) < 0.3
        time.sleep(0.2)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(records)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.WARNING or r.exc_info] == []


def test_a_shutdown_answers_what_its_grace_period_cannot_finish(served, slow_steps):
    _, params, tokenizer, fixture_engine = served
    # the module engine's shapes: its compiled programs serve this engine too
    engine = Engine(params, MODEL_CFG, tokenizer, n_slots=fixture_engine.n_slots, max_queue=64)
    events = []
    requests = [Request(prompt=[1, 100 + i], max_tokens=28, emit=events.append, temperature=0) for i in range(18)]
    engine.start()
    engine.submit(*requests)  # 16 decoding, 2 queued
    wait_for(lambda: engine.load()["active"] == 16, 60)
    start = time.perf_counter()
    engine.stop(timeout=0.3)  # 28 steps of 50 ms do not fit
    assert time.perf_counter() - start < 1.5
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 18 and all(f.error == SHUTDOWN_ERROR for f in finished)
    engine = Engine(params, MODEL_CFG, tokenizer, n_slots=fixture_engine.n_slots, max_queue=64)
    events.clear()
    engine.start()
    engine.submit(Request(prompt=[1, 100], max_tokens=3, emit=events.append, temperature=0))
    engine.stop(timeout=30)  # fits: finished normally
    assert [(e.finish_reason, e.completion_tokens) for e in events if isinstance(e, Finished)] == [("length", 3)]


def test_the_grace_period_flag_is_checked():
    from llama2_jax.cli import serve as serve_cli

    assert serve_cli.parse_args(["--checkpoint=c", "--tokenizer=t", "--grace_period=2.5"]).grace_period == 2.5
    with pytest.raises(SystemExit):
        serve_cli.parse_args(["--checkpoint=c", "--tokenizer=t", "--grace_period=-1"])


def rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * 4096 / 2 ** 20


def one_client(url: str, i: int, results: list) -> None:
    """Client i of a wave: streaming or not, mixed prompt and reply lengths; every 8th leaves early."""
    stream, leaves = i % 2 == 0, i % 8 == 3
    max_tokens = 2 + (7 * i) % 14
    body = {"model": "tiny", "prompt": " ".join(["word"] * (1 + i % 12)), "max_tokens": max_tokens,
            "temperature": 0 if i % 3 else 0.8, "seed": i, "stream": stream}
    if leaves:
        with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True, max_tokens=15),
                          timeout=30) as response:
            next(response.iter_lines())
        results.append(("left", None))
        return
    if not stream:
        out = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        results.append(("whole", (out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"], max_tokens)))
        return
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream_options={"include_usage": True}),
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    reason = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    results.append(("stream", (reason, chunks[-1]["usage"]["completion_tokens"], max_tokens, lines[-1])))


def leftovers() -> int:
    """Engine requests and events still alive (a leak of the server's bookkeeping)."""
    gc.collect()
    kinds = (Request, Piece, Finished, engine_module._Active)
    return sum(isinstance(o, kinds) for o in gc.get_objects())


@pytest.mark.slow
def test_load_of_64_concurrent_clients_in_two_identical_waves(served):
    url, _, _, engine = served
    baseline = leftovers()  # what earlier tests may still hold
    waves, records = [], Records()
    logging.getLogger("uvicorn.error").addHandler(records)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        for _ in range(3):  # a first wave warms every path; the next two must not grow anything
            results, start = [], time.perf_counter()
            list(pool.map(lambda i: one_client(url, i, results), range(64)))
            elapsed = time.perf_counter() - start
            wait_for(lambda: engine.load() == {"active": 0, "queued": 0, "slots": 16}, 10)  # no slot leaks
            assert len(results) == 64
            for kind, outcome in results:
                if kind == "whole":
                    reason, tokens, max_tokens = outcome
                    assert (reason, tokens) == ("length", max_tokens) or (reason == "stop" and tokens < max_tokens)
                elif kind == "stream":
                    reason, tokens, max_tokens, last = outcome
                    assert last == "data: [DONE]"
                    assert (reason, tokens) == ("length", max_tokens) or (reason == "stop" and tokens < max_tokens)
            assert sum(kind == "left" for kind, _ in results) == 8
            waves.append((elapsed, leftovers(), len(jax.live_arrays()), rss_mb()))
    logging.getLogger("uvicorn.error").removeHandler(records)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.WARNING or r.exc_info] == []
    (_, left_1, arrays_1, rss_1), (_, left_2, arrays_2, rss_2) = waves[1], waves[2]
    # nothing of the requests is kept, on the host or the device
    assert left_1 <= baseline and left_2 <= baseline and arrays_2 <= arrays_1, (baseline, waves)
    # RSS moves in allocator-sized steps (glibc arenas, XLA's CPU allocator): the same probe on the engine before
    # this work wandered 613-683 MB over 16 waves; a leak of the requests' buffers would grow without bound
    assert rss_2 - rss_1 < 64, waves
    assert max(w[0] for w in waves) < 40, waves
