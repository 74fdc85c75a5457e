"""Readers of pairwise preference data for reward models (paper section 3.2.2), and their Llama 2 chat encoding.

Every reader yields `PreferencePair`s: a prompt (a dialog ending with a user message, optionally starting with a
system message), a chosen and a rejected response, an optional Meta-style rating and a safety flag.

Formats (``read_preferences(path, format=...)``; "auto" uses `detect_format`). JSONL or a JSON list of records.

* ``"jsonl"``: ``{"prompt": str | [messages], "chosen": str, "rejected": str, "rating": str | null (optional),
  "is_safety": bool (optional), "chosen_safe"/"rejected_safe": bool (optional safety label per answer),
  "origin": one of ORIGINS (optional)}``. A string prompt is one user message. ``rating`` is one of RATINGS (spaces
  and hyphens are read as underscores, case is ignored; "unsure" is "negligibly_better", the paper's fourth level
  "negligibly better / unsure") or null. `write_preferences` writes this format.
* ``"oasst_pairs"``: the derived OpenAssistant pairs (``oasst-en-100-pairs.jsonl``): the "jsonl" format with a
  message-list prompt, plus ``chosen_rank``/``rejected_rank`` and ids, which are ignored. ``rating`` stays None:
  OASST ranks only *order* sibling replies (rank 0 = best); a rank difference says nothing about how much better
  a reply is, so it is not mapped onto Meta's four strength levels (a margin loss then uses margin 0).
* ``"hh"``: raw Anthropic HH-RLHF records ``{"chosen": transcript, "rejected": transcript}``, each transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. Each transcript is split at its last ``"\\n\\nAssistant:"``: the text up
  to and including it is the prompt, the rest is the response (stripped). When the two prompts differ (the
  transcripts diverge before the last Assistant turn, e.g. have different numbers of turns) the record is dropped
  and counted in ``stats.dropped`` — the same rule that made the derived file below (2,312 -> 2,307 records).
* ``"hh_prompt"``: the derived ``{"prompt": transcript ending in "\\n\\nAssistant:", "chosen": str, "rejected":
  str}``. Responses are stripped.

HH prompt transcripts are turned into messages by `llama2_jax.text.chat_format.parse_hh_transcript`.

``is_safety``: ``read_preferences(..., is_safety=None)`` takes the record's ``is_safety`` field (default False);
pass True/False to set it for every pair (e.g. True for Anthropic *harmless* data, which feeds the Safety RM).
``origin`` likewise (``origin=None`` takes the record's field, default None = not stated): "collected" for pairs
labelled by this project's own annotation (the paper's Meta Helpfulness / Meta Safety data, section 3.2.1),
"open_source" for public preference sets (Anthropic HH, OASST, ...). The helpfulness RM mix tells them apart
(`llama2_jax.data.rm.helpful_mix`).
Records whose chosen and rejected responses are identical are dropped (they carry no preference).

Error rules as in `llama2_jax.data.dialogs`: a malformed record raises ``ValueError("<file>:<line>: <reason>")``
or, with ``on_error="skip"``, is counted in ``stats.skipped`` and reported in a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

from llama2_jax.data.dialogs import (
    DropRecord,
    OnError,
    ReadStats,
    convert_records,
    first_record,
    require_dict,
    require_str,
)
from llama2_jax.text import chat_format as chat

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
RATING_ALIASES = {"unsure": "negligibly_better", "negligibly_better_or_unsure": "negligibly_better",
                  "negligibly_better_/_unsure": "negligibly_better"}  # the paper's label "negligibly better / unsure"
ORIGINS = ("collected", "open_source")  # own annotation (the paper's "Meta" data) | public preference sets
_HH_ASSISTANT = "\n\nAssistant:"
_HH_HUMAN = "\n\nHuman:"


@dataclasses.dataclass
class PreferencePair:
    """One comparison. `prompt` ends with a user message; `chosen` was preferred over `rejected`."""
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    rating: str | None = None  # one of RATINGS, or None when unknown
    is_safety: bool = False
    chosen_safe: bool | None = None  # safety label of each answer (None = not labelled); the safety RM mix drops
    rejected_safe: bool | None = None  # pairs whose chosen answer is unsafe and the other safe (paper section 3.2.2)
    origin: str | None = None  # one of ORIGINS, or None when not stated

    @property
    def chosen_unsafe_other_safe(self) -> bool:
        """The label bin the paper's safety collection excludes: chosen unsafe, rejected safe."""
        return self.chosen_safe is False and self.rejected_safe is True

    def __post_init__(self):
        chat.normalize_dialog(self.prompt, last_role="user")
        require_str(self.chosen, "'chosen'")
        require_str(self.rejected, "'rejected'")
        if self.rating is not None and self.rating not in RATINGS:
            raise ValueError(f"rating {self.rating!r}, expected one of {', '.join(RATINGS)} or None")
        if not isinstance(self.is_safety, bool):
            raise ValueError(f"is_safety is {type(self.is_safety).__name__}, expected a bool")
        for name in ("chosen_safe", "rejected_safe"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"'{name}' is {type(getattr(self, name)).__name__}, expected true/false/null")
        if self.origin is not None and self.origin not in ORIGINS:
            raise ValueError(f"'origin' is {self.origin!r}, expected one of {', '.join(ORIGINS)} or null")


def normalize_rating(rating: Any) -> str | None:
    """Read a rating field: None, or a RATINGS name (case and "-"/" " vs "_" ignored); ValueError otherwise."""
    if rating is None:
        return None
    name = require_str(rating, "'rating'").strip().lower().replace("-", "_").replace(" ", "_")
    name = RATING_ALIASES.get(name, name)
    if name not in RATINGS:
        raise ValueError(f"rating {rating!r}, expected one of {', '.join(RATINGS)} or null")
    return name


def _prompt_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise ValueError(f"'prompt' is {type(prompt).__name__}, expected a string or a list of messages")
    for i, message in enumerate(prompt):
        chat.check_message(message, i)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _make_pair(prompt, chosen: str, rejected: str, rating=None, is_safety=False, chosen_safe=None,
               rejected_safe=None, origin=None) -> PreferencePair:
    if chosen == rejected:
        raise DropRecord("chosen == rejected")
    return PreferencePair(prompt, chosen, rejected, rating, is_safety, chosen_safe, rejected_safe, origin)


# ----------------------------------------------------------------------------------------------------------------------
# Format converters: record -> PreferencePair (is_safety: None = take the record's field)


def _safety(record: dict, is_safety: bool | None) -> bool:
    if is_safety is not None:
        return is_safety
    value = record.get("is_safety", False)
    if not isinstance(value, bool):
        raise ValueError(f"'is_safety' is {type(value).__name__}, expected true/false")
    return value


def _origin(record: dict, origin: str | None) -> str | None:
    return record.get("origin") if origin is None else origin


def jsonl_to_pair(record: Any, is_safety: bool | None = None, origin: str | None = None) -> PreferencePair:
    record = require_dict(record, "prompt", "chosen", "rejected")
    return _make_pair(
        _prompt_messages(record["prompt"]),
        require_str(record["chosen"], "'chosen'"),
        require_str(record["rejected"], "'rejected'"),
        normalize_rating(record.get("rating")),
        _safety(record, is_safety),
        record.get("chosen_safe"),
        record.get("rejected_safe"),
        _origin(record, origin),
    )


def hh_prompt_messages(transcript: str) -> list[dict[str, str]]:
    """Messages of an HH prompt transcript ending in "\\n\\nAssistant:"; ValueError unless they end with a user turn."""
    if not transcript.rstrip(" ").endswith(_HH_ASSISTANT):
        raise ValueError(f"HH prompt does not end with '\\n\\nAssistant:': ...{transcript[-40:]!r}")
    messages = chat.parse_hh_transcript(transcript)
    if messages[-1]["role"] != "user":
        raise ValueError("HH prompt does not end with a Human turn")
    return messages


def split_hh_transcript(transcript: str) -> tuple[str, str]:
    """``(prompt, response)``: the transcript up to and including its last "\\n\\nAssistant:", and the rest."""
    cut = transcript.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"HH transcript has no '\\n\\nAssistant:' turn: {transcript[:40]!r}")
    cut += len(_HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def hh_to_pair(record: Any, is_safety: bool | None = None, origin: str | None = None) -> PreferencePair:
    record = require_dict(record, "chosen", "rejected")
    chosen_prompt, chosen = split_hh_transcript(require_str(record["chosen"], "'chosen'"))
    rejected_prompt, rejected = split_hh_transcript(require_str(record["rejected"], "'rejected'"))
    if chosen_prompt != rejected_prompt:
        raise DropRecord("chosen and rejected differ before the last Assistant turn")
    return _make_pair(hh_prompt_messages(chosen_prompt), chosen.strip(), rejected.strip(),
                      None, _safety(record, is_safety), origin=_origin(record, origin))


def hh_prompt_to_pair(record: Any, is_safety: bool | None = None, origin: str | None = None) -> PreferencePair:
    record = require_dict(record, "prompt", "chosen", "rejected")
    return _make_pair(
        hh_prompt_messages(require_str(record["prompt"], "'prompt'")),
        require_str(record["chosen"], "'chosen'").strip(),
        require_str(record["rejected"], "'rejected'").strip(),
        normalize_rating(record.get("rating")),
        _safety(record, is_safety),
        origin=_origin(record, origin),
    )


CONVERTERS: dict[str, Callable[..., PreferencePair]] = {
    "jsonl": jsonl_to_pair,
    "oasst_pairs": jsonl_to_pair,
    "hh": hh_to_pair,
    "hh_prompt": hh_prompt_to_pair,
}


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points


def detect_format(path: str | os.PathLike) -> str:
    """Name of the preference format of `path` (a key of CONVERTERS), from its first record."""
    record = first_record(path)
    keys = set(record) if isinstance(record, dict) else set()
    if {"chosen", "rejected"} <= keys:
        prompt = record.get("prompt")
        if prompt is None and str(record["chosen"]).startswith(_HH_HUMAN):
            return "hh"
        if isinstance(prompt, str) and prompt.startswith(_HH_HUMAN):
            return "hh_prompt"
        if "chosen_rank" in keys or "message_tree_id" in keys:
            return "oasst_pairs"
        if prompt is not None:
            return "jsonl"
    raise ValueError(f"{os.fspath(path)}: unknown preference format (first record keys: {sorted(keys)}); "
                     f"known formats: {', '.join(CONVERTERS)}")


def read_preferences(
    path: str | os.PathLike, format: str = "auto", on_error: OnError = "raise", is_safety: bool | None = None,
    origin: str | None = None,
) -> tuple[list[PreferencePair], ReadStats]:
    """Read `path` as preference pairs; returns ``(pairs, stats)``. See the module docstring for formats and rules."""
    if format == "auto":
        format = detect_format(path)
    if format not in CONVERTERS:
        raise ValueError(f"unknown preference format {format!r}; known formats: auto, {', '.join(CONVERTERS)}")
    if origin is not None and origin not in ORIGINS:
        raise ValueError(f"origin={origin!r}, expected one of {', '.join(ORIGINS)} or None")
    convert = functools.partial(CONVERTERS[format], is_safety=is_safety, origin=origin)
    return convert_records(path, format, convert, on_error)


def pair_record(pair: PreferencePair) -> dict[str, Any]:
    """The "jsonl" record of a pair (read back by `jsonl_to_pair` to an equal pair)."""
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "rating": pair.rating,
            "is_safety": pair.is_safety, "chosen_safe": pair.chosen_safe, "rejected_safe": pair.rejected_safe,
            "origin": pair.origin}


def write_preferences(path: str | os.PathLike, pairs: Sequence[PreferencePair]) -> None:
    """Write pairs as "jsonl" records, atomically (a temporary file renamed over `path`)."""
    path = os.fspath(path)
    with open(path + ".tmp", "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair_record(pair)) + "\n")
    os.replace(path + ".tmp", path)


def encode_pair(tokenizer, pair: PreferencePair) -> tuple[list[int], list[int]]:
    """Chat-format tokens of prompt + chosen and of prompt + rejected (the response as the last assistant answer).

    Equal to ``encode_dialog_for_training(tokenizer, pair.prompt + [assistant response])[0]``: every completed pair
    BOS ... EOS, so each sequence ends with the response, the "▁" piece and EOS.
    """
    def encode(response: str) -> list[int]:
        dialog = pair.prompt + [{"role": "assistant", "content": response}]
        return chat.encode_dialog_for_training(tokenizer, dialog)[0]

    return encode(pair.chosen), encode(pair.rejected)
