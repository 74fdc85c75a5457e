"""API keys: with keys set, every path but /health needs `Authorization: Bearer KEY` (401 with OpenAI's error body
otherwise), keys are compared in constant time and never echoed or logged; --api_key and the LLAMA2_JAX_API_KEYS file
are read and checked before anything loads; a server on a non-loopback address without keys warns at start.

Covers llama2_jax.serve.guard."""

import logging

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
testclient = pytest.importorskip("fastapi.testclient")

from helpers.serving import served  # noqa: E402,F401  (the module's server)

from llama2_jax.cli import serve as serve_cli  # noqa: E402
from llama2_jax.serve import guard  # noqa: E402
from llama2_jax.serve.api import create_app  # noqa: E402

KEYS = ("sk-first-key", "sk-second-key")
WRONG = "sk-wrong-key-0123"


@pytest.fixture
def keyed(served):
    """A TestClient of an app with KEYS over the module's (running) engine; its lifespan is not run, so the shared
    engine keeps running."""
    return testclient.TestClient(create_app(served[3], "tiny", api_keys=KEYS))


def test_health_is_open_and_everything_else_needs_a_key(keyed):
    assert keyed.get("/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/metrics"), ("GET", "/v1/unknown"), ("GET", "/docs"), ("GET", "/openapi.json")]:
        response = keyed.request(method, path, json={"model": "tiny", "prompt": "a", "max_tokens": 1})
        assert response.status_code == 401, (path, response.text)
        assert response.json() == {"error": {"message": guard.MISSING_KEY, "type": "invalid_request_error",
                                             "param": None, "code": None}}
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_key_is_401_invalid_api_key_and_never_echoed_or_logged(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    for header in (f"Bearer {WRONG}", f"Bearer {KEYS[0]}x", f"Basic {KEYS[0]}", KEYS[0]):
        response = keyed.get("/v1/models", headers={"authorization": header})
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == ("invalid_api_key" if header.startswith("Bearer") else None)
        assert WRONG not in response.text and KEYS[0] not in response.text
    assert all(WRONG not in record.getMessage() and KEYS[0] not in record.getMessage() for record in caplog.records)


def test_every_key_is_accepted_with_the_openai_client(keyed):
    for key in KEYS:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=keyed, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens == 2
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=WRONG, http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []
    compare = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or compare(a, b))
    ring = guard.KeyRing(["a", "b" * 40, "c"])
    for offered in ("a", "c", "b" * 40, "nope", "x" * 1000):
        calls.clear()
        assert ring.accepts(offered) == (offered in ("a", "c", "b" * 40))
        assert calls == [(32, 32)] * 3  # every key, always, on equal-length digests: no early exit, no length leak


def test_api_keys_from_flags_and_the_key_file(tmp_path, monkeypatch, capsys):
    key_file = tmp_path / "keys"
    key_file.write_text("# production\nsk-from-file\n\n  sk-second  \n")
    monkeypatch.setenv(guard.KEYS_ENV, str(key_file))
    args = serve_cli.parse_args(["--checkpoint=c", "--tokenizer=t", "--api_key=sk-flag", "--api_key=sk-flag2"])
    assert args.api_keys == ["sk-flag", "sk-flag2", "sk-from-file", "sk-second"]
    for content, message in [(None, "cannot read the key file"), ("# none\n\n", "holds no key"),
                             ("sk-a sk-b\n", "contains whitespace")]:
        path = tmp_path / "bad"
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content)
        monkeypatch.setenv(guard.KEYS_ENV, str(path))
        with pytest.raises(SystemExit):
            serve_cli.parse_args(["--checkpoint=c", "--tokenizer=t"])
        err = capsys.readouterr().err
        assert err.startswith(f"error: {guard.KEYS_ENV}={path}: ") and message in err and len(err.splitlines()) == 1
    monkeypatch.delenv(guard.KEYS_ENV)
    with pytest.raises(SystemExit):
        serve_cli.parse_args(["--checkpoint=c", "--tokenizer=t", "--api_key="])
    assert "--api_key must be a non-empty key" in capsys.readouterr().err


@pytest.mark.parametrize("host,keys,warns", [("0.0.0.0", [], True), ("192.168.1.5", [], True), ("::", [], True),
                                             ("myhost.example", [], True), ("0.0.0.0", ["k"], False),
                                             ("127.0.0.1", [], False), ("localhost", [], False), ("::1", [], False)])
def test_a_non_loopback_address_without_keys_warns(host, keys, warns):
    warning = serve_cli.exposure_warning(host, keys)
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith(f"warning: serving on {host} without API keys") and "--api_key" in warning
