"""OpenAI request bodies -> engine requests: every field checked, a bad one is an `ApiError` (HTTP 400 with an
OpenAI-style error body) naming the field, raised before anything reaches the engine."""

from __future__ import annotations

import secrets
from typing import Any, Optional

from llama2_jax.inference.decode import TOP_LOGPROBS
from llama2_jax.serve.engine import Request
from llama2_jax.text import chat_format as chat

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    """An error answered with `status` and {"error": {"message", "type", "param", "code"}}."""
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, kind=float):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    return kind(value)


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model", model_name)
    if model != model_name:
        raise ApiError(f"unknown model {model!r}: this server serves {model_name!r}", "model")


def encode_prompts(prompt: Any, tokenizer) -> list[list[int]]:
    """A prompt string, a list of strings, a token list or a list of token lists -> token lists (strings get BOS)."""
    is_tokens = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str):
        prompt = [prompt]
    elif is_tokens(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError("prompt must be a string, a list of strings, or token lists", "prompt")
    out = []
    for item in prompt:
        if isinstance(item, str):
            out.append(tokenizer.encode(item, bos=True, eos=False))
        elif is_tokens(item) and all(0 <= t < tokenizer.vocab_size for t in item):
            out.append(list(item))
        else:
            raise ApiError("every prompt must be a string or a non-empty list of token ids in the vocabulary",
                           "prompt")
    return out


def encode_messages(messages: Any, tokenizer) -> list[int]:
    """Chat messages -> Meta's chat-format prompt tokens; special tags in any message are a 400."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    try:
        tokens = chat.encode_dialog(tokenizer, messages)
    except (ValueError, TypeError, KeyError) as error:
        raise ApiError(f"messages: {error}", "messages") from None
    if chat.dialog_has_special_tags(messages):
        raise ApiError(f"messages: {chat.UNSAFE_ERROR}", "messages")
    return tokens


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stop)


def make_requests(body: dict, prompts: list[list[int]], max_len: int, emit_for, *, default_max_tokens: Optional[int],
                  allow_logprobs: bool) -> list[Request]:
    """Check the sampling fields and build one engine `Request` per prompt; emit_for(index) is its callback.
    default_max_tokens None: the rest of the context."""
    temperature = _number(body, "temperature", 1.0)
    if not temperature >= 0:
        raise ApiError(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _number(body, "seed", None, int) if body.get("seed") is not None else secrets.randbelow(2 ** 31)
    if not 0 <= seed < 2 ** 31:
        raise ApiError(f"seed must be in [0, 2**31), got {seed}", "seed")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(f"echo must be a boolean, got {echo!r}", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and allow_logprobs:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= TOP_LOGPROBS:
            raise ApiError(f"logprobs must be an integer in [0, {TOP_LOGPROBS}], got {logprobs!r}", "logprobs")
        if body.get("stream"):
            raise ApiError("logprobs are not available with stream=true on this server", "logprobs")
    elif logprobs is not None:
        raise ApiError("logprobs are not supported by /v1/chat/completions on this server", "logprobs")
    stop = parse_stop(body)
    requests = []
    for index, prompt in enumerate(prompts):
        if len(prompt) >= max_len:
            raise ApiError(f"the prompt has {len(prompt)} tokens; the context is {max_len} tokens (prompt + "
                           f"completion), so at most {max_len - 1} fit", "prompt" if "prompt" in body else "messages")
        room = max_len - len(prompt)
        max_tokens = _number(body, "max_tokens", room if default_max_tokens is None else default_max_tokens, int)
        if "max_completion_tokens" in body and "max_tokens" not in body:
            max_tokens = _number(body, "max_completion_tokens", room, int)
        if max_tokens <= 0:
            raise ApiError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            if "max_tokens" in body or "max_completion_tokens" in body:
                raise ApiError(f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens exceed the context "
                               f"of {max_len} tokens", "max_tokens")
            max_tokens = room  # the default only
        requests.append(Request(prompt=prompt, max_tokens=max_tokens, emit=emit_for(index), temperature=temperature,
                                top_p=top_p, seed=seed, stop=stop, logprobs=logprobs, echo=echo))
    return requests
