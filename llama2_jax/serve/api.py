"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health. `stream=true` answers server-sent events ("data: {json}\\n\\n" ... "data: [DONE]").
Every response carries usage counts (streams: in the last chunk). Bad requests are HTTP 400 with an OpenAI-style
error body, a full queue is 429; the server keeps serving either way."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from llama2_jax.serve.engine import Engine, Finished, Piece, QueueFull, Request
from llama2_jax.serve.guard import MAX_BODY_BYTES, Guard, KeyRing, parse_body
from llama2_jax.serve.requests import (
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    check_model,
    encode_messages,
    encode_prompts,
    make_requests,
)

DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, model_name: str = "llama2_jax", *, api_keys: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; the engine thread runs for the app's lifetime (it is
    started here if not yet running, and stopped after the in-flight requests finish). With `api_keys`, every path
    but /health needs `Authorization: Bearer KEY`; bodies over `max_body_bytes` are refused (413), see `Guard`."""

    async def lifespan(app: FastAPI):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="llama2_jax", lifespan=lifespan)
    app.add_middleware(Guard, keys=KeyRing(api_keys), max_body_bytes=max_body_bytes)
    tokenizer = engine.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llama2_jax", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_body(http, model_name)
        prompts = await asyncio.to_thread(encode_prompts, body.get("prompt"), tokenizer)  # long texts take seconds
        texts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        texts = [t if isinstance(t, str) else tokenizer.decode(p) for t, p in zip(texts, prompts)] \
            if len(texts) == len(prompts) else [tokenizer.decode(p) for p in prompts]
        events, requests = submit(http, body, prompts, DEFAULT_COMPLETION_TOKENS, allow_logprobs=True)
        echo = bool(body.get("echo"))
        if body.get("stream"):
            return sse(completion_chunks(http, events, requests, texts if echo else None))
        finished = await gather(http, events, requests)
        choices = [{"index": i, "text": (texts[i] if echo else "") + f.text, "finish_reason": f.finish_reason,
                    "logprobs": logprobs_body(f, tokenizer)} for i, f in enumerate(finished)]
        return response("text_completion", "cmpl", choices, finished)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await read_body(http, model_name)
        prompt = await asyncio.to_thread(encode_messages, body.get("messages"), tokenizer)
        events, requests = submit(http, body, [prompt], None, allow_logprobs=False)
        if body.get("stream"):
            return sse(chat_chunks(http, events, requests))
        finished = await gather(http, events, requests)
        choices = [{"index": 0, "message": {"role": "assistant", "content": finished[0].text},
                    "finish_reason": finished[0].finish_reason}]
        return response("chat.completion", "chatcmpl", choices, finished)

    def response(kind: str, prefix: str, choices: list, finished: list[Finished]) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage(finished)}

    def submit(http, body, prompts, default_max_tokens, *, allow_logprobs):
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(f"n must be 1 on this server, got {n!r}", "n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        emit_for = lambda index: lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))
        requests = make_requests(body, prompts, engine.max_len, emit_for, default_max_tokens=default_max_tokens,
                                 allow_logprobs=allow_logprobs)
        if len(requests) > engine.max_queue:  # could never be queued, however idle the server
            raise ApiError(f"this request asks for {len(requests)} completions (prompts x n); this server queues at "
                           f"most {engine.max_queue} (--max_queue)", "prompt" if "prompt" in body else "n")
        try:
            engine.submit(*requests)
        except QueueFull as error:
            raise ApiError(str(error), None, 429, "rate_limit_error") from None
        except RuntimeError as error:
            raise ApiError(str(error), None, 503, "server_error") from None
        return events, requests

    async def completion_chunks(http, events, requests, echo_texts) -> AsyncIterator[dict]:
        chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        chunk = lambda choices, **extra: {"id": chunk_id, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": choices, **extra}
        if echo_texts:
            for i, text in enumerate(echo_texts):
                yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
        finished = {}
        async for index, event in stream_events(http, events, requests):
            if isinstance(event, Piece):
                yield chunk([{"index": index, "text": event.text, "logprobs": None, "finish_reason": None}])
            else:
                finished[index] = event
                yield chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": event.finish_reason}])
        yield chunk([], usage=usage([finished[i] for i in sorted(finished)]))

    async def chat_chunks(http, events, requests) -> AsyncIterator[dict]:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        chunk = lambda choices, **extra: {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                                          "model": model_name, "choices": choices, **extra}
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        finished = []
        async for _index, event in stream_events(http, events, requests):
            if isinstance(event, Piece):
                yield chunk([{"index": 0, "delta": {"content": event.text}, "finish_reason": None}])
            else:
                finished.append(event)
                yield chunk([{"index": 0, "delta": {}, "finish_reason": event.finish_reason}])
        yield chunk([], usage=usage(finished))

    return app


async def read_body(http: HttpRequest, model_name: str) -> dict[str, Any]:
    body = parse_body(await http.body())  # read in full by `Guard`
    check_model(body, model_name)
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(f"stream must be a boolean, got {body['stream']!r}", "stream")
    return body


async def next_event(http: HttpRequest, events: asyncio.Queue, requests: list[Request]):
    """The next (index, event); when the client has gone away, cancel the requests (freeing their slots)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                cancel(requests)
                raise asyncio.CancelledError from None


def cancel(requests: list[Request]) -> None:
    for request in requests:
        request.cancelled.set()


async def stream_events(http, events, requests) -> AsyncIterator[tuple[int, object]]:
    """Engine events until every request has finished; an engine error ends the stream with an error event."""
    remaining = len(requests)
    try:
        while remaining:
            index, event = await next_event(http, events, requests)
            if isinstance(event, Finished):
                remaining -= 1
                if event.error:
                    raise RuntimeError(event.error)
            yield index, event
    finally:
        if remaining:  # the client went away (the generator is closed) or the engine failed
            cancel(requests)


async def gather(http, events, requests) -> list[Finished]:
    finished: dict[int, Finished] = {}
    while len(finished) < len(requests):
        index, event = await next_event(http, events, requests)
        if isinstance(event, Finished):
            if event.error:
                cancel(requests)
                raise ApiError(f"generation failed: {event.error}", None, 500, "server_error")
            finished[index] = event
    return [finished[i] for i in range(len(requests))]


def usage(finished: list[Finished]) -> dict[str, int]:
    prompt = sum(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.sp.id_to_piece(int(token)).replace("\u2581", " ")


def logprobs_body(finished: Finished, tokenizer) -> Optional[dict]:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs ({token text: log-probability}) and
    text_offset (characters before each token in the returned text, approximated by the token texts' lengths)."""
    if finished.token_logprobs is None:
        return None
    tokens = [token_text(tokenizer, t) for t in finished.tokens]
    offsets, total = [], 0
    for text in tokens:
        offsets.append(total)
        total += len(text)
    top = [None if entry is None else {token_text(tokenizer, t): v for t, v in entry.items()}
           for entry in finished.top_logprobs]
    return {"tokens": tokens, "token_logprobs": finished.token_logprobs, "top_logprobs": top, "text_offset": offsets}


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except RuntimeError as error:  # the engine failed on this request
            yield f"data: {json.dumps(ApiError(str(error), None, 500, 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")
