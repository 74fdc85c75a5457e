"""A completion's text as it streams: the reply decoded as a continuation of its prompt, the text that must wait
(an incomplete UTF-8 character, a possible start of a stop string), stop strings, and which tokens a text covers."""

from __future__ import annotations

from typing import Optional, Sequence

CONTEXT_TOKENS = 4  # prompt tokens decoded in front of a reply (see reply_text)


def reply_text(tokenizer, prompt: Sequence[int], reply: Sequence[int]) -> str:
    """The reply's text as it continues the prompt: SentencePiece drops the leading space of a text's first piece, so
    decode it after the prompt's last tokens and cut their text off (prompt + reply text then equals the decoded
    whole)."""
    context = list(prompt[-CONTEXT_TOKENS:])
    before, whole = tokenizer.decode(context), tokenizer.decode(context + list(reply))
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(list(reply))


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` must wait: an incomplete UTF-8 character, or a prefix of a stop."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def cut_at_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """The index of the first stop string in text, or None."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None


def tokens_covering(tokenizer, prompt: Sequence[int], reply: Sequence[int], chars: int, start: int = 0) -> int:
    """The number k >= start of leading reply tokens whose text fits in the first `chars` characters of the reply's
    text (the tokens that a client has been shown in full): the largest such k, counting up from start."""
    k = start
    while k < len(reply) and len(reply_text(tokenizer, prompt, reply[:k + 1])) <= chars:
        k += 1
    return k


def tokens_for_text(tokenizer, prompt: Sequence[int], reply: Sequence[int], chars: int) -> int:
    """The fewest leading reply tokens whose text has at least `chars` characters (what a text cut at a stop
    string needs)."""
    return next(k for k in range(len(reply) + 1) if len(reply_text(tokenizer, prompt, reply[:k])) >= chars)
