"""What the server checks before a route sees a request: the API key, the body's size, and the body's JSON (its
nesting depth and that every string is valid Unicode). Each failure is answered with OpenAI's error body
({"error": {"message", "type", "param", "code"}}); nothing here raises into the ASGI server's log.

`Guard` is a plain ASGI middleware (not a FastAPI dependency) so that it covers every path, unknown ones included,
and can refuse a body before reading it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from typing import Any, Iterable, Optional

from llama2_jax.serve.requests import ApiError

MAX_BODY_BYTES = 4 * 1024 * 1024  # default --max_body_bytes: ~250 prompts of 4,096 token ids each
MAX_JSON_DEPTH = 32  # an OpenAI request nests at most ~6 levels (messages[i].content[j].text)
OPEN_PATHS = ("/health",)  # answered without an API key (load balancers' health checks)

# OpenAI's wording (https://platform.openai.com/docs/guides/error-codes): a missing key and a wrong key. The key a
# client sent is never echoed (OpenAI shows a masked prefix; a log or proxy may keep the response).
MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
               "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
WRONG_KEY = "Incorrect API key provided."


KEYS_ENV = "LLAMA2_JAX_API_KEYS"  # the path of a file of API keys, one a line (# comments and blank lines skipped)


def read_key_file(path: str) -> list[str]:
    """The keys of a key file; ValueError (naming the file) when it cannot be read or holds none."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{KEYS_ENV}={path}: cannot read the key file: {error}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{KEYS_ENV}={path}: the key file holds no key")
    if any(any(c.isspace() for c in key) for key in keys):
        raise ValueError(f"{KEYS_ENV}={path}: a key contains whitespace (one key a line)")
    return keys


def is_loopback(host: str) -> bool:
    """Whether binding `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: reachable from wherever it resolves
        return False


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The accepted API keys, kept as SHA-256 digests: `accepts(key)` compares the digest of the offered key with
    every accepted one in constant time (hmac.compare_digest on equal-length digests, no early exit), so neither the
    timing nor the key's length tells a client anything."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        offered = _digest(key)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(offered, digest)
        return found


def bearer_key(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """The key of an `Authorization: Bearer KEY` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


def content_length(headers: list[tuple[bytes, bytes]]) -> Optional[int]:
    """The Content-Length header's value; -1 when it is not a number (answered 400 by the caller)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else -1
    return None


async def send_error(send, error: ApiError, extra_headers: tuple = ()) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Guard:
    """ASGI middleware: Bearer API keys on every path but OPEN_PATHS (when `keys` is non-empty), then the body read
    here in full, up to `max_body_bytes` (HTTP 413 beyond: refused from the Content-Length header before reading,
    or as soon as a chunked body passes the limit), and replayed to the app. A client that goes away before its body
    is complete gets nothing: there is no one to answer (starlette would raise ClientDisconnect into the log)."""

    def __init__(self, app, *, keys: KeyRing, max_body_bytes: int, metrics=None):
        self.app, self.keys, self.max_body_bytes, self.metrics = app, keys, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is None:
            return await self.guard(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.guard(scope, receive, send_counted)
        finally:
            if status is not None:  # None: the client left before an answer
                self.metrics.request_done(scope.get("path", ""), status)

    async def guard(self, scope, receive, send):
        headers = scope.get("headers", [])
        if self.keys and scope.get("path") not in OPEN_PATHS:
            key = bearer_key(headers)
            if key is None or not self.keys.accepts(key):
                error = ApiError(MISSING_KEY if key is None else WRONG_KEY, None, 401,
                                 code=None if key is None else "invalid_api_key")
                return await send_error(send, error, ((b"www-authenticate", b"Bearer"),))
        length = content_length(headers)
        if length == -1:
            return await send_error(send, ApiError("the Content-Length header is not a number"))
        if length is not None and length > self.max_body_bytes:
            return await send_error(send, self.too_large(length))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client abandoned its request
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await send_error(send, self.too_large(None))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the client's disconnect, for the routes that watch for it

        await self.app(scope, replay, send)

    def too_large(self, length: Optional[int]) -> ApiError:
        size = f"{length} bytes" if length is not None else "more"
        return ApiError(f"the request body has {size}; this server accepts at most {self.max_body_bytes} bytes "
                        "(--max_body_bytes)", None, 413)


def parse_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The request body as a JSON object; ApiError (400) unless it is valid JSON nested at most max_depth levels
    whose strings are all valid Unicode."""
    try:
        body = json.loads(raw)
    except RecursionError:  # json's C scanner stops at the interpreter's recursion limit
        raise ApiError(f"the request body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    check_json(body, max_depth)
    return body


def check_json(body: dict, max_depth: int) -> None:
    """ApiError naming the top-level field when `body` nests deeper than max_depth or holds a string that is not
    valid Unicode (JSON's \\ud800-\\udfff escapes can spell lone surrogates, which no tokenizer can encode)."""
    stack: list[tuple[Any, int, Optional[str]]] = [(body, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            _check_text(value, field)
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                raise ApiError(f"the request body nests deeper than {max_depth} levels", field)
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, field or key)
                    if isinstance(item, (str, dict, list)):
                        stack.append((item, depth + 1, field or key))
            else:
                stack.extend((item, depth + 1, field) for item in value if isinstance(item, (str, dict, list)))


def _check_text(text: str, field: Optional[str]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = f"{field} has" if field else "the request body has"
        raise ApiError(f"{where} text that is not valid Unicode: {error.reason} {text[error.start]!r} at "
                       f"character {error.start}", field) from None
