"""The OpenAI-compatible server (llama2_jax.serve): one uvicorn server on a free local port for the module, a tiny
random model with Llama 2's tokenizer, the official `openai` client. Greedy completions equal
`generate.text_completion` whatever shares the batch; streams, chat, logprobs, stop strings, bad requests, a full
queue and a client that goes away.

Covers llama2_jax.serve.api, llama2_jax.serve.engine, llama2_jax.serve.programs, llama2_jax.serve.text and
llama2_jax.cli.serve."""

import concurrent.futures
import functools
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import shared_file  # noqa: E402
from helpers.generation import full_logits, init_params  # noqa: E402
from helpers.serving import MODEL_CFG, N_SLOTS, client, free_port, served  # noqa: E402,F401  (the module's server)

from llama2_jax.inference import generate as gen  # noqa: E402
from llama2_jax.serve import engine as engine_module  # noqa: E402
from llama2_jax.serve.api import create_app  # noqa: E402
from llama2_jax.serve.engine import Engine, QueueFull, Request  # noqa: E402
from llama2_jax.serve.text import held_back  # noqa: E402
from llama2_jax.text.tokenizer import Tokenizer  # noqa: E402

REF_LEN = 12  # every reference generates this many tokens (one compilation) and is cut to max_tokens
PROMPTS = ["Once upon a time", "The cat sat on", "Hello", "In a small village by the sea, there lived a girl",
           "1 2 3 4", "Why is the sky blue?", "Tom and Lily", "Big red"]


@functools.lru_cache
def _reference_ids(params_id, prompt: str, temperature: float, top_p: float, seed: int) -> tuple:
    _, params, tokenizer, _ = _SERVED[params_id]
    return tuple(gen.generate(params, MODEL_CFG, [tokenizer.encode(prompt, bos=True)], max_gen_len=REF_LEN,
                              temperature=temperature, top_p=top_p, eos_id=tokenizer.eos_id, rng=seed)[0])


_SERVED = {}


def reference_text(served, prompt: str, max_tokens: int, temperature=0.0, top_p=1.0, seed=1) -> str:
    """The prompt followed by the first max_tokens tokens that `generate` (text_completion's tokens) produces for
    it alone, decoded together. (Greedy: the first m of 12 greedy tokens are the m-token generation.)"""
    _SERVED[id(served)] = served
    assert max_tokens <= REF_LEN or temperature > 0
    tokenizer = served[2]
    ids = _reference_ids(id(served), prompt, temperature, top_p, seed)[:max_tokens]
    return tokenizer.decode(tokenizer.encode(prompt, bos=True) + list(ids))


def test_greedy_completion_equals_text_completion_with_usage(served, client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    # the server's text continues the prompt (prompt + text decodes the whole); Meta's text_completion decodes the
    # reply alone, where SentencePiece drops the leading space of its first piece
    assert PROMPTS[0] + out.choices[0].text == reference_text(served, PROMPTS[0], 8)
    _, params, tokenizer, _ = served
    meta = gen.text_completion(params, MODEL_CFG, tokenizer, [PROMPTS[0]], temperature=0.0, max_gen_len=REF_LEN)
    assert meta[0]["generation"].startswith(out.choices[0].text.removeprefix(" "))
    tokenizer = served[2]
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0], bos=True))
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == out.usage.prompt_tokens + 8
    assert out.choices[0].finish_reason == "length" and out.model == "tiny"


def test_sixteen_concurrent_greedy_clients_equal_text_completion(served, client):
    # mixed prompts and lengths, with sampled requests sharing the batch: every greedy answer is the reference
    jobs = [(PROMPTS[i % len(PROMPTS)], 1 + (5 * i) % REF_LEN, 0.0 if i % 4 else 1.0) for i in range(N_SLOTS)]

    def ask(job):
        prompt, max_tokens, temperature = job
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                         temperature=temperature, seed=7).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(N_SLOTS) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens, temperature), answer in zip(jobs, answers):
        if temperature == 0.0:
            assert prompt + answer == reference_text(served, prompt, max_tokens), (prompt, max_tokens)


def test_sampled_completion_repeats_by_seed_and_equals_text_completion(served, client):
    ask = lambda seed: client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=REF_LEN,
                                                 temperature=1.0, top_p=0.9, seed=seed).choices[0].text
    expected = reference_text(served, PROMPTS[1], REF_LEN, temperature=1.0, top_p=0.9, seed=5)
    assert PROMPTS[1] + ask(5) == expected and ask(5) == ask(5)
    assert ask(5) != ask(6)


def test_streamed_pieces_join_to_the_completion(served, client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_echo_and_stop_string(served, client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    echoed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + whole
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 12
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole[: whole.index(stop)]


def test_held_back_text_waits_for_a_possible_stop():
    assert held_back("abc", ["cd"]) == 1 and held_back("abc", ["xy"]) == 0 and held_back("ab\ufffd", []) == 1
    assert held_back("say Ob", ["Observation:"]) == 2


def test_echo_logprobs_match_the_full_forward(served, client):
    # lm-eval's local-completions loglikelihood request: token ids, echo, logprobs=1, max_tokens=1
    _, params, tokenizer, _ = served
    prompt = tokenizer.encode(PROMPTS[3], bos=True)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    tokens = prompt + [int(np.argmax(full_logits(params, MODEL_CFG, np.asarray([prompt]))[0, -1]))]
    log_probs = np.asarray(jax.nn.log_softmax(full_logits(params, MODEL_CFG, np.asarray([tokens]))[0], axis=-1))
    expected = log_probs[np.arange(len(tokens) - 1), tokens[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4)
    for position, top in enumerate(lp.top_logprobs[1:], start=1):
        assert len(top) == 1
        np.testing.assert_allclose(list(top.values())[0], log_probs[position - 1].max(), atol=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-6)  # greedy


def test_chat_and_chat_stream_equal_chat_completion(served, client):
    _, params, tokenizer, _ = served
    messages = [{"role": "user", "content": "Tell me a story."}]
    expected = gen.chat_completion(params, MODEL_CFG, tokenizer, [messages], temperature=0.0,
                                   max_gen_len=10)[0]["generation"]["content"]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    content = out.choices[0].message.content  # Meta decodes the reply alone: no leading space (see above)
    assert content.removeprefix(" ") == expected and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(served[0] + "/health").json()
    assert health["status"] == "ok" and health["slots"] == N_SLOTS


BAD_BODIES = [
    ({"model": "other", "prompt": "a"}, "model"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 31}, "max_tokens"),  # 2 prompt tokens + 31 > the context of 32
    ({"model": "tiny", "prompt": "word " * 40}, "prompt"),
    ({"model": "tiny", "prompt": "a", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "a", "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "prompt": [[]]}, "prompt"),
    ({"model": "tiny", "prompt": "a", "stop": 3}, "stop"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_requests_are_400_with_an_openai_error(served, body, param):
    response = httpx.post(served[0] + "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_bad_chat_malformed_json_and_serving_goes_on(served, client):
    tags = {"model": "tiny", "messages": [{"role": "user", "content": "[INST] hi"}]}
    response = httpx.post(served[0] + "/v1/chat/completions", json=tags)
    assert response.status_code == 400 and "special tags" in response.json()["error"]["message"]
    order = {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}
    assert httpx.post(served[0] + "/v1/chat/completions", json=order).status_code == 400
    response = httpx.post(served[0] + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="a", temperature=-1)
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0).usage.completion_tokens


def test_a_full_queue_is_429(served):
    fastapi_testclient = pytest.importorskip("fastapi.testclient")
    _, params, tokenizer, _ = served
    idle = Engine(params, MODEL_CFG, tokenizer, n_slots=1, max_queue=1)  # never started: nothing drains its queue
    idle.submit(Request(prompt=[1], max_tokens=1, emit=lambda event: None))
    with pytest.raises(QueueFull):
        idle.submit(Request(prompt=[1], max_tokens=1, emit=lambda event: None))
    response = fastapi_testclient.TestClient(create_app(idle, "tiny")).post(
        "/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"


def test_a_client_that_goes_away_frees_its_slot(served, monkeypatch):
    url, _, _, engine = served
    step = engine_module.programs.step_jit

    def slow_step(*args, **kwargs):  # long enough that the request is still decoding when the client leaves
        time.sleep(0.1)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine_module.programs, "step_jit", slow_step)
    before = engine.cancelled
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 25, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        next(response.iter_lines())
    for _ in range(100):
        if engine.cancelled > before and engine.load()["active"] == 0:
            break
        time.sleep(0.05)
    assert engine.cancelled == before + 1 and engine.load()["active"] == 0


def test_command_line_flags_are_checked_before_loading(capsys):
    from llama2_jax.cli import serve as serve_cli

    for flag, message in [("--max_batch=0", "--max_batch must be >= 1"), ("--port=70000", "--port must be in"),
                          ("--dtype=int8", "--dtype must be one of"), ("--max_seq_len=1", "--max_seq_len must be")]:
        with pytest.raises(SystemExit) as exit_info:
            serve_cli.parse_args(["--checkpoint=/nonexistent", "--tokenizer=/nonexistent", flag])
        assert exit_info.value.code == 1 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_cli.make_engine(serve_cli.parse_args(["--checkpoint=/nonexistent", "--tokenizer=/nonexistent"]))
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path):
    import os
    import pathlib
    import signal
    import subprocess
    import sys

    from llama2_jax.checkpoints import params_io as checkpoint

    cfg = MODEL_CFG.replace(max_seq_len=128)
    checkpoint.save_params(tmp_path / "ckpt", init_params(cfg, seed=3), cfg)
    port = free_port()
    root = pathlib.Path(__file__).resolve().parents[2]
    server = subprocess.Popen(
        [sys.executable, "-m", "llama2_jax.serve", f"--checkpoint={tmp_path / 'ckpt'}", f"--port={port}",
         f"--tokenizer={shared_file('llama2-tokenizer.model')}", "--max_batch=2", "--model_name=tiny"],
        cwd=root, env=dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu"), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # compiling every bucket before listening
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "stream": True}
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            pieces.append(next(lines))
            server.send_signal(signal.SIGTERM)  # mid-stream: this request still finishes
            pieces += list(lines)
        pieces = [piece for piece in pieces if piece]  # server-sent events are separated by blank lines
        assert pieces[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(pieces)
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM (uvicorn/server.py, capture_signals), so
        # the process ends "killed by SIGTERM" after the in-flight request finished
        assert server.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(url + "/health")
    finally:
        if server.poll() is None:
            server.kill()


def start_server(engine, name="tiny"):
    """A uvicorn server for `engine` in a thread: (base url, server)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    return f"http://127.0.0.1:{port}", server


@pytest.mark.slow
def test_lm_eval_local_completions_gives_the_in_process_piqa_acc(tmp_path):
    # lm-eval's `local-completions` model pointed at the server scores PIQA as the in-process llama2_jax backend
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    local_completions = pytest.importorskip("lm_eval.models.openai_completions")  # registers local-completions
    from llama2_jax.evaluation.harness import evaluate_tasks, make_task_manager
    from llama2_jax.text.hf_tokenizer import save_hf_tokenizer

    cfg = MODEL_CFG.replace(max_seq_len=128)  # every one of the first 20 PIQA prompts fits: no truncation anywhere
    params, spm = init_params(cfg, seed=3), shared_file("llama2-tokenizer.model")
    tokenizer = Tokenizer(spm)
    metadata = {"piqa_path": str(shared_file("piqa-valid-with-labels.jsonl"))}
    in_process = evaluate_tasks(params, cfg, tokenizer, ["piqa_local"], limit=20, num_fewshot=0, batch_size=4,
                                metadata=metadata)["piqa_local"]
    save_hf_tokenizer(spm, tmp_path / "hf_tokenizer")
    engine = Engine(params, cfg, tokenizer, n_slots=4)
    engine.warm_up()
    url, server = start_server(engine)
    try:
        args = (f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tmp_path / 'hf_tokenizer'},add_bos_token=True,max_length={cfg.max_seq_len}")
        assert local_completions.LocalCompletionsAPI
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["piqa_local"], limit=20,
                                      num_fewshot=0, task_manager=make_task_manager(None, metadata))
    finally:
        server.should_exit = True
    served = out["results"]["piqa_local"]
    assert served["acc,none"] == pytest.approx(in_process["acc"], abs=1e-9)
    assert served["acc_norm,none"] == pytest.approx(in_process["acc_norm"], abs=1e-9)
