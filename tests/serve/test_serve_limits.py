"""The server under hostile or careless input: bodies over the size limit (413, refused before they are read), JSON
nested without bound, text that is not valid Unicode, a client that abandons its body half-sent, a port already in
use, and one request that asks for more completions than the queue can ever hold."""

import json
import logging
import socket
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from helpers.serving import Records, served  # noqa: E402,F401  (the module's server)

from llama2_jax.serve.api import create_app  # noqa: E402


def raw_request(url: str, head: bytes, body: bytes = b"", *, close: bool = False, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the server; return what it answers (b"" when close: the client leaves without reading)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        if close:
            return b""
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
            "\r\n").encode()


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    url = served[0]
    start = time.perf_counter()
    answer = raw_request(url, post_head("/v1/completions", 20_000_000))  # announced, never sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.perf_counter() - start < 5
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "at most 4194304 bytes" in error["message"] and "--max_body_bytes" in error["message"]
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_the_body_limit_is_configurable_and_covers_chunked_bodies(served):
    testclient = pytest.importorskip("fastapi.testclient")
    client = testclient.TestClient(create_app(served[3], "tiny", max_body_bytes=1000))
    small = {"model": "tiny", "prompt": "a", "max_tokens": 1, "user": "x" * 900}
    assert client.post("/v1/completions", json=small).status_code == 200
    big = dict(small, user="x" * 1000)
    response = client.post("/v1/completions", json=big)
    assert response.status_code == 413 and "at most 1000 bytes" in response.json()["error"]["message"]
    chunks = iter([b'{"model": "tiny", "prompt": "', b"x" * 800, b"x" * 800, b'"}'])  # no Content-Length
    assert client.post("/v1/completions", content=chunks).status_code == 413


def test_json_nested_without_bound_is_400_and_the_connection_stays_open(served):
    url = served[0]
    with httpx.Client(base_url=url) as client:
        response = client.post("/v1/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert "nests deeper than 32 levels" in response.json()["error"]["message"]
        assert response.headers.get("connection") != "close"
        nested = {"model": "tiny", "prompt": "a", "user": json.loads("[" * 40 + "]" * 40)}
        response = client.post("/v1/completions", json=nested)
        assert response.status_code == 400 and response.json()["error"]["param"] == "user"
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1})
        assert ok.status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "tiny", "prompt": "a \ud800 b"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["ok", "\udfff"]}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi \ud83d"}]}, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["\ud800"]}, "stop"),
])
def test_text_that_is_not_valid_unicode_is_400(served, path, body, param):
    response = httpx.post(served[0] + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "not valid Unicode" in error["message"]


def test_a_client_that_abandons_its_body_leaves_no_traceback(served):
    url = served[0]
    records = Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(records)
    try:
        for path in ("/v1/completions", "/v1/chat/completions"):
            raw_request(url, post_head(path, 1000), b'{"model": "tiny", ', close=True)
        time.sleep(0.5)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        logger.removeHandler(records)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.WARNING or r.exc_info] == []


def test_more_completions_than_the_queue_holds_is_400_naming_the_limit(served):
    url, _, _, engine = served
    body = {"model": "tiny", "prompt": ["a"] * 200, "max_tokens": 1}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "200 completions" in error["message"] and "at most 64" in error["message"]
    assert "--max_queue" in error["message"] and error["param"] == "prompt"
    assert engine.load()["queued"] == 0 and engine.load()["active"] == 0


def test_a_port_in_use_is_reported_before_loading_or_compiling(capsys):
    from llama2_jax.cli import serve as serve_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist: the port is checked first
            serve_cli.main(["--checkpoint=/nonexistent", "--tokenizer=/nonexistent", f"--port={port}"])
    out = capsys.readouterr()
    assert exit_info.value.code == 1
    assert out.err.strip() == f"error: cannot listen on 127.0.0.1:{port}: the address is already in use"
    assert "serving" not in out.out
