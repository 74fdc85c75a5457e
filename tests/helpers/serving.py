"""The serving tests' shared server: a tiny random model (tests/helpers/generation.py) with Llama 2's tokenizer behind
one uvicorn server on a free local port per test module, the official `openai` client for it, and a helper that runs
requests straight through an engine."""

import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("httpx")

from conftest import shared_file  # noqa: E402

from helpers.generation import CFG, init_params  # noqa: E402
from llama2_jax.serve.api import create_app  # noqa: E402
from llama2_jax.serve.engine import Engine, Finished, Request  # noqa: E402
from llama2_jax.text.tokenizer import Tokenizer  # noqa: E402

MODEL_CFG = CFG.replace(vocab_size=32000, max_seq_len=32)
N_SLOTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """(base url, params, tokenizer, engine) of a running server."""
    params, tokenizer = init_params(MODEL_CFG, seed=3), Tokenizer(shared_file("llama2-tokenizer.model"))
    engine = Engine(params, MODEL_CFG, tokenizer, n_slots=N_SLOTS, max_queue=64)
    engine.warm_up()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", params, tokenizer, engine
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0)


def complete(engine: Engine, prompts: list[list[int]], **fields) -> list[Finished]:
    """Every prompt's Finished (submitted together), in order."""
    results, done = {}, threading.Semaphore(0)

    def emit_for(index):
        def emit(event):
            if isinstance(event, Finished):
                results[(index, event.sample)] = event
                done.release()
        return emit

    requests = [Request(prompt=p, emit=emit_for(i), **dict(dict(max_tokens=6, temperature=0, logprobs=2), **fields))
                for i, p in enumerate(prompts)]
    engine.submit(*requests)
    for _ in range(sum(r.n for r in requests)):
        assert done.acquire(timeout=120)
    return [results[key] for key in sorted(results)]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)
