"""Engine events -> OpenAI's response objects: completions and chat completions, whole or as stream chunks, with
usage and log-probabilities in each endpoint's own shape."""

from __future__ import annotations

import re
import time
import uuid
from typing import Optional

from llama2_jax.serve.engine import Finished, TokenLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's bytes: a byte-fallback piece <0xNN> is that byte; any other piece its UTF-8 text (the SentencePiece
    word boundary mark as a space)."""
    piece = tokenizer.sp.id_to_piece(int(token))
    match = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")


def token_text(tokenizer, token: int) -> str:
    """A token as text; a token that is part of a UTF-8 character is written as OpenAI writes such tokens,
    "bytes:\\xNN"."""
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(entries: list[TokenLogprob], tokenizer, offset: int = 0) -> dict:
    """/v1/completions' logprobs: tokens, token_logprobs, top_logprobs ({token text: log-probability}) and
    text_offset (characters before each token, counted from `offset` with the token texts' lengths)."""
    tokens = [token_text(tokenizer, e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top = [None if e.logprob is None else {token_text(tokenizer, t): v for t, v in e.top.items()} for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], tokenizer) -> dict:
    """/v1/chat/completions' logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}], "refusal": None}."""
    item = lambda token, logprob: {"token": token_text(tokenizer, token), "logprob": logprob,
                                   "bytes": list(token_bytes(tokenizer, token))}
    return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(t, v) for t, v in e.top.items()])
                        for e in entries], "refusal": None}


class Stream:
    """The chunks of one streamed response (shared id and creation time); `usage` chunk only when asked for."""

    def __init__(self, kind: str, model: str, include_usage: bool):
        prefix = "chatcmpl" if kind == "chat.completion.chunk" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.kind, self.model, self.include_usage = kind, model, include_usage

    def chunk(self, choices: list, usage_body: Optional[dict] = None) -> dict:
        out = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = usage_body  # null on every chunk but the last (OpenAI's stream_options.include_usage)
        return out


def response(kind: str, model: str, choices: list, usage_body: dict) -> dict:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_body}


def completion_choice(index: int, finished: Finished, tokenizer, echo_text: Optional[str]) -> dict:
    logprobs = None
    if finished.logprobs is not None:
        entries = (finished.prompt_logprobs or []) + finished.logprobs
        logprobs = completion_logprobs(entries, tokenizer)
    return {"index": index, "text": (echo_text or "") + finished.text, "finish_reason": finished.finish_reason,
            "logprobs": logprobs}


def chat_choice(index: int, finished: Finished, tokenizer) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": finished.text, "refusal": None},
            "finish_reason": finished.finish_reason,
            "logprobs": None if finished.logprobs is None else chat_logprobs(finished.logprobs, tokenizer)}
