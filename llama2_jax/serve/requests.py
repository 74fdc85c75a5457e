"""OpenAI request bodies -> engine requests: every field checked, a bad one is an `ApiError` (HTTP 400 with an
OpenAI-style error body) naming the field, raised before anything reaches the engine. A field this server does not
implement is refused by name (`REFUSED`), an unknown one as OpenAI refuses it ("Unrecognized request argument");
nothing is silently ignored. docs/serving.md lists every field."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Callable, Optional

from llama2_jax.serve.engine import Request
from llama2_jax.text import chat_format as chat

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
COMPLETION_LOGPROBS = 5  # OpenAI's completions allow logprobs <= 5
CHAT_TOP_LOGPROBS = 20  # OpenAI's chat allows top_logprobs <= 20
MAX_N = 128  # OpenAI's bound on n
MAX_STOPS = 4
MAX_LOGIT_BIAS = 300  # logit_bias entries (serve.programs.MAX_LOGIT_BIAS)

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "stop",
                 "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                               "tool_choice", "functions", "function_call", "parallel_tool_calls", "store",
                               "metadata", "service_tier", "modalities", "audio", "prediction", "reasoning_effort",
                               "web_search_options"}
# Fields this server does not implement: value -> None when the value means "not used" (accepted), else the
# reason it is refused.
REFUSED: dict[str, Callable[[Any, dict], Optional[str]]] = {
    "tools": lambda v, _: None if not v else "tools (function calling) are not supported by this server",
    "tool_choice": lambda v, _: None if v in (None, "none") else "tool_choice needs tools, which this server does "
                                                                   "not support",
    "functions": lambda v, _: None if not v else "functions (function calling) are not supported by this server",
    "function_call": lambda v, _: None if v in (None, "none") else "function_call needs functions, which this server "
                                                                     "does not support",
    "parallel_tool_calls": lambda v, _: None if v is None else "parallel_tool_calls needs tools, which this server "
                                                                "does not support",
    "response_format": lambda v, _: None if v is None or v == {"type": "text"} else
    "response_format other than {\"type\": \"text\"} (JSON mode, JSON schemas) is not supported by this server",
    "suffix": lambda v, _: None if v in (None, "") else "suffix (insertion) is not supported by this server",
    "best_of": lambda v, body: None if v is None or v == (body.get("n") or 1) else
    "best_of other than n is not supported by this server (it returns every completion it samples: use n)",
    "store": lambda v, _: None if v in (None, False) else "store (stored completions) is not supported by this server",
    "metadata": lambda v, _: None if v is None else "metadata is only for stored completions, which this server does "
                                                     "not support",
    "service_tier": lambda v, _: None if v in (None, "auto", "default") else "service_tier: this server has one tier",
    "modalities": lambda v, _: None if v in (None, ["text"]) else "modalities other than [\"text\"] are not "
                                                                  "supported by this server",
    "audio": lambda v, _: None if v is None else "audio output is not supported by this server",
    "prediction": lambda v, _: None if v is None else "prediction (predicted outputs) is not supported by this server",
    "reasoning_effort": lambda v, _: None if v is None else "reasoning_effort is for reasoning models; Llama 2 is not "
                                                             "one",
    "web_search_options": lambda v, _: None if v is None else "web search is not supported by this server",
}


class ApiError(Exception):
    """An error answered with `status` and {"error": {"message", "type", "param", "code"}}."""
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Sampling:
    """The checked fields of one request body, shared by its prompts."""
    max_tokens: Optional[int]  # None: the endpoint's default
    temperature: float
    top_p: float
    seed: int
    n: int
    stop: tuple[str, ...]
    logprobs: Optional[int]  # top tokens per position; None: no log-probabilities
    echo: bool
    frequency_penalty: float
    presence_penalty: float
    logit_bias: dict[int, float]
    stream: bool
    include_usage: bool  # streams: send the usage chunk (stream_options.include_usage)


def _number(body: dict, name: str, default, kind=float):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    return kind(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(f"{name} must be a boolean, got {value!r}", name)
    return bool(value)


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model", model_name)
    if model != model_name:
        raise ApiError(f"unknown model {model!r}: this server serves {model_name!r}", "model")


def check_fields(body: dict, allowed: set[str]) -> None:
    """Unknown fields and fields this server does not implement (with a value that is not their default) -> 400."""
    for name in body:
        if name not in allowed:
            raise ApiError(f"Unrecognized request argument supplied: {name}", name)
        reason = REFUSED[name](body[name], body) if name in REFUSED else None
        if reason:
            raise ApiError(reason, name)


def parse_sampling(body: dict, *, chat_api: bool, vocab_size: int) -> Sampling:
    """Check the fields shared by every prompt of the body (not the prompt or messages themselves)."""
    check_fields(body, CHAT_FIELDS if chat_api else COMPLETION_FIELDS)
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _number(body, "seed", None, int) if body.get("seed") is not None else secrets.randbelow(2 ** 31)
    if not 0 <= seed < 2 ** 31:
        raise ApiError(f"seed must be in [0, 2**31), got {seed}", "seed")
    n = _number(body, "n", 1, int)
    if not 1 <= n <= MAX_N:
        raise ApiError(f"n must be in [1, {MAX_N}], got {n}", "n")
    penalties = {}
    for name in ("frequency_penalty", "presence_penalty"):
        penalties[name] = _number(body, name, 0.0)
        if not -2 <= penalties[name] <= 2:
            raise ApiError(f"{name} must be in [-2, 2], got {penalties[name]}", name)
    stream = _bool(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise ApiError("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"} \
                or not isinstance(stream_options.get("include_usage", False), (bool, type(None))):
            raise ApiError(f"stream_options must be {{\"include_usage\": bool}}, got {stream_options!r}",
                           "stream_options")
    include_usage = _bool(stream_options or {}, "include_usage")
    return Sampling(max_tokens=_max_tokens(body), temperature=temperature, top_p=top_p, seed=seed, n=n,
                    stop=parse_stop(body), logprobs=_chat_logprobs(body) if chat_api else _completion_logprobs(body),
                    echo=False if chat_api else _bool(body, "echo"), logit_bias=parse_logit_bias(body, vocab_size),
                    stream=stream, include_usage=include_usage, **penalties)


def _max_tokens(body: dict) -> Optional[int]:
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    if body.get(name) is None:
        return None
    value = _number(body, name, None, int)
    if value < 1:
        raise ApiError(f"{name} must be >= 1, got {value}", name)
    return value


def _completion_logprobs(body: dict) -> Optional[int]:
    logprobs = body.get("logprobs")
    if logprobs is None or logprobs is False:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= COMPLETION_LOGPROBS:
        raise ApiError(f"logprobs must be an integer in [0, {COMPLETION_LOGPROBS}], got {logprobs!r}", "logprobs")
    return logprobs


def _chat_logprobs(body: dict) -> Optional[int]:
    """Chat: logprobs (bool) and top_logprobs (0-20, only with logprobs) -> the top tokens to report, or None."""
    wanted = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= CHAT_TOP_LOGPROBS:
        raise ApiError(f"top_logprobs must be an integer in [0, {CHAT_TOP_LOGPROBS}], got {top!r}", "top_logprobs")
    if not wanted:
        raise ApiError("top_logprobs needs logprobs=true", "top_logprobs")
    return top


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return tuple(stop)


def parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    """{"token id": bias in [-100, 100]} (JSON keys are strings) -> {id: bias}."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids to biases",
                       "logit_bias")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if token is None or token >= vocab_size:
            raise ApiError(f"logit_bias: {key!r} is not a token id of this model (0 .. {vocab_size - 1})",
                           "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], got {value!r}",
                           "logit_bias")
        out[token] = float(value)
    return out


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


def message_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...}, joined with newlines as
    vLLM joins them); any other part (images, audio, files) is a 400."""
    if not isinstance(content, list):
        return content  # chat_format checks the type
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(f"messages[{index}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                           f"are supported, got {kind!r}", "messages")
        if set(part) - {"type", "text"}:
            raise ApiError(f"messages[{index}].content[{j}]: unsupported field(s) "
                           f"{', '.join(sorted(set(part) - {'type', 'text'}))}", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def encode_messages(messages: Any, tokenizer) -> list[int]:
    """Chat messages -> Meta's chat-format prompt tokens; special tags in any message are a 400. A "developer"
    message is a system message (OpenAI's newer name for it)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    dialog = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}] must be a {{role, content}} object", "messages")
        extra = set(message) - {"role", "content"}
        if extra:
            raise ApiError(f"messages[{i}]: unsupported field(s) {', '.join(sorted(extra))} (this server supports "
                           "role and content)", "messages")
        role = "system" if message.get("role") == "developer" else message.get("role")
        dialog.append({"role": role, "content": message_text(message.get("content"), i)})
    try:
        tokens = chat.encode_dialog(tokenizer, dialog)
    except (ValueError, TypeError, KeyError) as error:
        raise ApiError(f"messages: {error}", "messages") from None
    if chat.dialog_has_special_tags(dialog):
        raise ApiError(f"messages: {chat.UNSAFE_ERROR}", "messages")
    return tokens


def make_requests(sampling: Sampling, prompts: list[list[int]], max_len: int, emit_for, *,
                  default_max_tokens: Optional[int], prompt_field: str) -> list[Request]:
    """One engine `Request` per prompt (each with sampling.n samples); emit_for(index) is its callback.
    default_max_tokens None: the rest of the context."""
    requests = []
    for index, prompt in enumerate(prompts):
        if len(prompt) >= max_len:
            raise ApiError(f"the prompt has {len(prompt)} tokens; the context is {max_len} tokens (prompt + "
                           f"completion), so at most {max_len - 1} fit", prompt_field)
        room = max_len - len(prompt)
        max_tokens = sampling.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise ApiError(f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens exceed the context of "
                           f"{max_len} tokens", "max_tokens")
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        requests.append(Request(prompt=prompt, max_tokens=max_tokens, emit=emit_for(index),
                                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                                stop=sampling.stop, logprobs=sampling.logprobs, echo=sampling.echo, n=sampling.n,
                                frequency_penalty=sampling.frequency_penalty,
                                presence_penalty=sampling.presence_penalty, logit_bias=sampling.logit_bias))
    return requests
