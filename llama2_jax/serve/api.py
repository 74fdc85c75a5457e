"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus). `stream=true` answers server-sent events ("data: {json}\\n\\n"
... "data: [DONE]"). Bad requests are HTTP 400 with an OpenAI-style error body, a full queue is 429; the server keeps
serving either way. A client that goes away cancels its completions at once (their slots are free at the next
step)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Optional, Sequence

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from llama2_jax.serve import responses as out
from llama2_jax.serve.engine import Engine, Finished, Piece, QueueFull, Request
from llama2_jax.serve.guard import MAX_BODY_BYTES, Guard, KeyRing, parse_body
from llama2_jax.serve.requests import (
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    Sampling,
    check_model,
    encode_messages,
    encode_prompts,
    make_requests,
    parse_sampling,
)

GONE = object()  # put in a request's event queue when its client disconnects


def create_app(engine: Engine, model_name: str = "llama2_jax", *, api_keys: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, grace_period: Optional[float] = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; the engine thread runs for the app's lifetime (it is
    started here if not yet running, and stopped after the in-flight requests finish, or after grace_period
    seconds). With `api_keys`, every path but /health needs `Authorization: Bearer KEY`; bodies over
    `max_body_bytes` are refused (413), see `Guard`."""

    async def lifespan(app: FastAPI):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, grace_period)

    app = FastAPI(title="llama2_jax", lifespan=lifespan)
    app.add_middleware(Guard, keys=KeyRing(api_keys), max_body_bytes=max_body_bytes, metrics=engine.metrics)
    tokenizer = engine.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(gauges(engine)), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llama2_jax", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_body(http, model_name)
        sampling = parse_sampling(body, chat_api=False, vocab_size=engine.cfg.vocab_size)
        prompts = await asyncio.to_thread(encode_prompts, body.get("prompt"), tokenizer)  # long texts take seconds
        texts = body["prompt"] if isinstance(body["prompt"], list) and len(body["prompt"]) == len(prompts) \
            else [body["prompt"]]
        texts = [t if isinstance(t, str) else tokenizer.decode(p) for t, p in zip(texts, prompts)]
        events, requests = submit(body, sampling, prompts, DEFAULT_COMPLETION_TOKENS, "prompt")
        echo = texts if sampling.echo else None
        if sampling.stream:
            stream = out.Stream("text_completion", model_name, sampling.include_usage)
            return sse(completion_chunks(stream, events, requests, sampling, echo))
        finished = await gather(http, events, requests, sampling.n)
        choices = [out.completion_choice(i, f, tokenizer, echo[i // sampling.n] if echo else None)
                   for i, f in enumerate(finished)]
        return out.response("text_completion", model_name, choices, usage_of(requests, finished))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await read_body(http, model_name)
        sampling = parse_sampling(body, chat_api=True, vocab_size=engine.cfg.vocab_size)
        prompt = await asyncio.to_thread(encode_messages, body.get("messages"), tokenizer)
        events, requests = submit(body, sampling, [prompt], None, "messages")
        if sampling.stream:
            stream = out.Stream("chat.completion.chunk", model_name, sampling.include_usage)
            return sse(chat_chunks(stream, events, requests, sampling))
        finished = await gather(http, events, requests, sampling.n)
        choices = [out.chat_choice(i, f, tokenizer) for i, f in enumerate(finished)]
        return out.response("chat.completion", model_name, choices, usage_of(requests, finished))

    def submit(body: dict, sampling: Sampling, prompts: list[list[int]], default_max_tokens: Optional[int],
               prompt_field: str) -> tuple[asyncio.Queue, list[Request]]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        emit_for = lambda index: lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))
        requests = make_requests(sampling, prompts, engine.max_len, emit_for, default_max_tokens=default_max_tokens,
                                 prompt_field=prompt_field)
        total = len(requests) * sampling.n
        if total > engine.max_queue:  # could never be queued, however idle the server
            raise ApiError(f"this request asks for {total} completions (prompts x n); this server queues at most "
                           f"{engine.max_queue} (--max_queue)", "n" if sampling.n > 1 else prompt_field)
        try:
            engine.submit(*requests)
        except QueueFull as error:
            raise ApiError(str(error), None, 429, "rate_limit_error") from None
        except RuntimeError as error:
            raise ApiError(str(error), None, 503, "server_error") from None
        return events, requests

    async def completion_chunks(stream: out.Stream, events, requests, sampling: Sampling, echo_texts
                                ) -> AsyncIterator[dict]:
        offsets: dict[int, int] = {}  # choice -> characters sent (text_offset of its next token)
        finished: dict[int, Finished] = {}
        async for index, event in stream_events(events, requests, sampling.n):
            if isinstance(event, Piece):
                text = echo_texts[index // sampling.n] if event.echo else event.text
                logprobs = None
                if event.logprobs is not None:
                    logprobs = out.completion_logprobs(event.logprobs, tokenizer, offsets.get(index, 0))
                    offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1]) \
                        if event.logprobs else offsets.get(index, 0)
                yield stream.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}])
            else:
                finished[index] = event
                yield stream.chunk([{"index": index, "text": "", "logprobs": None,
                                     "finish_reason": event.finish_reason}])
        if stream.include_usage:
            yield stream.chunk([], usage_of(requests, [finished[i] for i in sorted(finished)]))

    async def chat_chunks(stream: out.Stream, events, requests, sampling: Sampling) -> AsyncIterator[dict]:
        for index in range(sampling.n):
            yield stream.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
        finished = []
        async for index, event in stream_events(events, requests, sampling.n):
            if isinstance(event, Piece):
                logprobs = None if event.logprobs is None else out.chat_logprobs(event.logprobs, tokenizer)
                yield stream.chunk([{"index": index, "delta": {"content": event.text}, "logprobs": logprobs,
                                     "finish_reason": None}])
            else:
                finished.append(event)
                yield stream.chunk([{"index": index, "delta": {}, "logprobs": None,
                                     "finish_reason": event.finish_reason}])
        if stream.include_usage:
            yield stream.chunk([], usage_of(requests, finished))

    return app


def gauges(engine: Engine) -> list[tuple[str, str, str, float]]:
    """(name, kind, help, value) of what /metrics reads from the engine now."""
    load = engine.load()
    rows = [("queue_depth", "gauge", "completions waiting for a slot", load["queued"]),
            ("active_slots", "gauge", "decode slots in use", load["active"]),
            ("slots", "gauge", "decode slots", load["slots"])]
    if engine.prefix is not None:
        hits, lookups = engine.prefix.hit_tokens, engine.prefix.lookup_tokens
        rows += [("prefix_cache_hit_tokens_total", "counter", "prompt tokens whose KV came from the prefix cache",
                  hits),
                 ("prefix_cache_lookup_tokens_total", "counter", "prompt tokens looked up in the prefix cache",
                  lookups),
                 ("prefix_cache_hit_rate", "gauge", "hit tokens / looked-up tokens", hits / lookups if lookups else 0),
                 ("prefix_cache_blocks", "gauge", "blocks in use in the prefix cache", len(engine.prefix))]
    return rows


async def read_body(http: HttpRequest, model_name: str) -> dict[str, Any]:
    body = parse_body(await http.body())  # read in full by `Guard`
    check_model(body, model_name)
    return body


def cancel(requests: list[Request]) -> None:
    for request in requests:
        request.cancelled.set()


def choice_index(index: int, event, n: int) -> int:
    """OpenAI orders choices prompt by prompt, the n samples of each together."""
    return index * n + event.sample


async def stream_events(events: asyncio.Queue, requests: list[Request], n: int
                        ) -> AsyncIterator[tuple[int, object]]:
    """(choice index, engine event) until every completion has finished; an engine error ends the stream with an
    error event. Closing the generator (the client went away: starlette cancels the response) cancels the
    requests."""
    remaining = len(requests) * n
    try:
        while remaining:
            index, event = await events.get()
            if isinstance(event, Finished):
                remaining -= 1
                if event.error:
                    raise RuntimeError(event.error)
            yield choice_index(index, event, n), event
    finally:
        if remaining:
            cancel(requests)


async def watch_disconnect(http: HttpRequest, requests: list[Request], events: asyncio.Queue) -> None:
    """Wait for the client to go away; then cancel its requests and wake `gather`."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    cancel(requests)
    events.put_nowait((None, GONE))


async def gather(http: HttpRequest, events: asyncio.Queue, requests: list[Request], n: int) -> list[Finished]:
    """Every completion's `Finished`, in choice order."""
    watcher = asyncio.create_task(watch_disconnect(http, requests, events))
    finished: dict[int, Finished] = {}
    try:
        while len(finished) < len(requests) * n:
            index, event = await events.get()
            if event is GONE:  # answered for the log and the metrics only: nobody reads it (nginx's 499)
                raise ApiError("the client closed the request", None, 499, "client_closed_request")
            if isinstance(event, Finished):
                if event.error:
                    cancel(requests)
                    raise ApiError(f"generation failed: {event.error}", None, 500, "server_error")
                finished[choice_index(index, event, n)] = event
    finally:
        watcher.cancel()
    return [finished[i] for i in range(len(finished))]


def usage_of(requests: list[Request], finished: list[Finished]) -> dict[str, int]:
    """Prompt tokens once per prompt (its n samples share it), completion tokens of every sample."""
    return out.usage(sum(len(r.prompt) for r in requests), sum(f.completion_tokens for f in finished))


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except RuntimeError as error:  # the engine failed on this request
            yield f"data: {json.dumps(ApiError(str(error), None, 500, 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")
