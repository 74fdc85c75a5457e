"""Readers that turn common SFT data formats into dialogs for `llama2_jax.text.chat_format.encode_dialog_for_training`.

A dialog is a list of ``{"role": "system" | "user" | "assistant", "content": str}``: an optional leading system
message, then user/assistant messages alternating, ending with an assistant message.

Formats (``read_dialogs(path, format=...)``; "auto" uses `detect_format`). Files may be a JSON list or JSONL
(one JSON object per line, blank lines ignored) unless noted.

* ``"messages"``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` per record.
* ``"alpaca"``: ``{"instruction": str, "input": str (optional), "output": str}`` per record. The user message is
  the instruction, followed by a blank line and the input when the input is not empty:
  ``instruction + ("\\n\\n" + input if input.strip() else "")``; the assistant message is the output. (The Alpaca
  template's "### Instruction:/### Input:" headers are not used: Llama 2 chat has its own [INST] format.)
* ``"sharegpt"``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}`` per record
  ("user"/"assistant"/"chatgpt"/"bing"/"bard" are accepted as synonyms).
* ``"oasst_trees"`` (JSONL): one OpenAssistant message tree per line, ``{"message_tree_id", "prompt": message}``;
  a message has ``role`` ("prompter" | "assistant"), ``text``, ``deleted``, ``rank`` (assistant siblings, 0 = best;
  may be absent or null), ``synthetic`` and ``replies`` (child messages). One dialog per tree, following one path
  from the root: at a prompter message take the best assistant reply (the lowest non-null ``rank`` among replies
  that are not deleted; if none is ranked, the first reply that is not deleted); at an assistant message take the
  first prompter reply that is not deleted. The path stops at a message with no such reply; a trailing unanswered
  prompter message is dropped. Synthetic messages are kept like the others. A tree whose root has no usable
  assistant reply yields no dialog and is counted in ``stats.dropped``.

Malformed records raise ``ValueError("<file>:<line>: <reason>")`` for JSONL or ``"<file>: record <i>: <reason>"``
(0-based index) for a JSON list. With ``on_error="skip"`` they are skipped, counted in ``stats.skipped`` (the first
messages kept in ``stats.errors``) and a warning with the count is logged. A JSON list that is not valid JSON as a
whole cannot be skipped record by record and always raises.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Literal

from llama2_jax.data import records as dataset_records
from llama2_jax.text import chat_format as chat

OnError = Literal["raise", "skip"]
ON_ERROR = ("raise", "skip")
MAX_KEPT_ERRORS = 20

_log = logging.getLogger(__name__)


class DropRecord(Exception):
    """Raised by a converter for a well-formed record that yields nothing by rule (counted, never an error)."""


@dataclasses.dataclass
class ReadStats:
    """What a reader did with a file. ``records == kept + skipped + dropped``."""
    path: str
    format: str
    records: int = 0  # records read (JSONL lines that are not blank, or JSON list items)
    kept: int = 0  # records that produced an item (dialog or preference pair)
    skipped: int = 0  # malformed records skipped with on_error="skip"
    dropped: int = 0  # well-formed records that yield nothing by a documented rule
    drop_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)  # the first MAX_KEPT_ERRORS skip messages


# ----------------------------------------------------------------------------------------------------------------------
# Generic record reading, shared with `llama2_jax.data.preferences`


@dataclasses.dataclass
class InvalidJson:
    """Placeholder for a JSONL line that did not parse."""
    error: str


def _is_json_list(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:  # a peek: bad bytes are reported by the reader
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == "["
    return False


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` for a JSON list file or a JSONL file.

    location is ``"file:line"`` (1-based) for JSONL, ``"file: record i"`` (0-based) for a JSON list and for a
    ``hf:``/``tfds:`` dataset spec (`llama2_jax.data.records`). A JSONL line that is not valid JSON is yielded as an
    `InvalidJson` record so that the caller can skip it like any malformed record.
    """
    if dataset_records.is_dataset_spec(path):  # hf:... / tfds:... (see llama2_jax.data.records)
        yield from dataset_records.iter_dataset_records(path)
        return
    path = os.fspath(path)
    if _is_json_list(path):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        for i, record in enumerate(records):
            yield f"{path}: record {i}", record
        return
    checked_single_object = False
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                checked_single_object = checked_single_object or _reject_single_object(path)
                record = InvalidJson(str(err))
            yield f"{path}:{line_number}", record


def _reject_single_object(path: str) -> bool:
    """A JSONL line failed to parse: when the whole file is one (multi-line) JSON object, say so (ValueError)
    instead of reporting a broken line. Returns True otherwise."""
    with open(path, encoding="utf-8") as f:
        try:
            whole = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return True
    if isinstance(whole, dict):
        lists = [key for key, value in whole.items() if isinstance(value, list)]
        hint = f" (its list is under {', '.join(map(repr, lists))}: write that list as the file)" if lists else ""
        raise ValueError(f"{path}: the file is a single JSON object; expected a JSON list of records or JSONL (one "
                         f"record per line){hint}")
    return True


def first_record(path: str | os.PathLike) -> Any:
    """The first record of a JSON list or JSONL file (ValueError when the file has none or it is not JSON)."""
    for location, record in iter_records(path):
        if isinstance(record, InvalidJson):
            raise ValueError(f"{location}: invalid JSON ({record.error})")
        return record
    raise ValueError(f"{os.fspath(path)}: no records")


def convert_records(path, format_name: str, convert: Callable[[Any], Any], on_error: OnError):
    """Run `convert` on every record of `path`; returns ``(items, ReadStats)`` with the error rules described above.

    `convert` raises ValueError for a malformed record and `DropRecord` for one that yields nothing by rule.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}, expected one of {', '.join(ON_ERROR)}")
    stats = ReadStats(path=os.fspath(path), format=format_name)
    items = []
    for location, record in iter_records(path):
        stats.records += 1
        try:
            if isinstance(record, InvalidJson):
                raise ValueError(f"invalid JSON ({record.error})")
            items.append(convert(record))
            stats.kept += 1
        except DropRecord as drop:
            stats.dropped += 1
            stats.drop_reasons[str(drop)] += 1
        except ValueError as err:
            message = f"{location}: {err}"
            if on_error == "raise":
                raise ValueError(message) from None
            stats.skipped += 1
            if len(stats.errors) < MAX_KEPT_ERRORS:
                stats.errors.append(message)
    _warn_about(stats)
    return items, stats


def _warn_about(stats: ReadStats) -> None:
    if stats.skipped:
        _log.warning("%s: skipped %d malformed record(s) of %d; first: %s",
                     stats.path, stats.skipped, stats.records, stats.errors[0])
    if stats.dropped:
        _log.warning("%s: dropped %d record(s) of %d by rule: %s",
                     stats.path, stats.dropped, stats.records, dict(stats.drop_reasons))


def require_dict(record: Any, *keys: str) -> dict:
    """Raise ValueError unless `record` is a dict holding every key in `keys`."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(map(repr, missing))} (has {', '.join(map(repr, record))})")
    return record


def require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, expected a string")
    return value


def validated_dialog(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Check a training dialog (optional system, alternating, ending with assistant); return it unchanged."""
    chat.normalize_dialog(messages, last_role="assistant")
    return messages


# ----------------------------------------------------------------------------------------------------------------------
# Format converters: record -> dialog


def messages_to_dialog(record: Any) -> list[dict[str, str]]:
    messages = require_dict(record, "messages")["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"'messages' is {type(messages).__name__}, expected a list")
    for i, message in enumerate(messages):
        chat.check_message(message, i)
    return validated_dialog([{"role": m["role"], "content": m["content"]} for m in messages])


def alpaca_to_dialog(record: Any) -> list[dict[str, str]]:
    record = require_dict(record, "instruction", "output")
    instruction = require_str(record["instruction"], "'instruction'")
    extra = require_str(record.get("input") or "", "'input'")
    output = require_str(record["output"], "'output'")
    if not instruction.strip():
        raise ValueError("empty 'instruction'")
    if not output.strip():
        raise ValueError("empty 'output'")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


SHAREGPT_ROLES = {
    "human": "user", "user": "user", "system": "system",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}


def sharegpt_to_dialog(record: Any) -> list[dict[str, str]]:
    turns = require_dict(record, "conversations")["conversations"]
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' is {type(turns).__name__}, expected a list")
    dialog = []
    for i, turn in enumerate(turns):
        turn = require_dict(turn, "from", "value")
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"turn {i} has 'from' {turn['from']!r}, expected one of {', '.join(SHAREGPT_ROLES)}")
        content = require_str(turn["value"], f"turn {i} 'value'")
        dialog.append({"role": SHAREGPT_ROLES[turn["from"]], "content": content})
    return validated_dialog(dialog)


def _oasst_best_assistant(replies: list[dict]) -> dict | None:
    candidates = [r for r in replies if r.get("role") == "assistant" and not r.get("deleted")]
    ranked = [r for r in candidates if r.get("rank") is not None]
    if ranked:
        return min(ranked, key=lambda r: r["rank"])
    return candidates[0] if candidates else None


def _oasst_next_prompter(replies: list[dict]) -> dict | None:
    return next((r for r in replies if r.get("role") == "prompter" and not r.get("deleted")), None)


def _oasst_message(message: Any, where: str) -> dict:
    message = require_dict(message, "role", "text")
    if message["role"] not in ("prompter", "assistant"):
        raise ValueError(f"{where} has role {message['role']!r}, expected 'prompter' or 'assistant'")
    require_str(message["text"], f"{where} 'text'")
    if not isinstance(message.get("replies", []), list):
        raise ValueError(f"{where} 'replies' is not a list")
    return message


def oasst_tree_to_dialog(record: Any) -> list[dict[str, str]]:
    message = _oasst_message(require_dict(record, "prompt")["prompt"], "prompt")
    if message["role"] != "prompter":
        raise ValueError(f"tree root has role {message['role']!r}, expected 'prompter'")
    if message.get("deleted"):
        raise DropRecord("root message deleted")
    dialog: list[dict[str, str]] = []
    while message is not None:
        message = _oasst_message(message, f"message {len(dialog)}")
        dialog.append({"role": "user" if message["role"] == "prompter" else "assistant", "content": message["text"]})
        pick = _oasst_best_assistant if message["role"] == "prompter" else _oasst_next_prompter
        message = pick(message.get("replies") or [])
    if dialog[-1]["role"] == "user":
        dialog.pop()
    if not dialog:
        raise DropRecord("root prompt has no assistant reply")
    return validated_dialog(dialog)


CONVERTERS: dict[str, Callable[[Any], list[dict[str, str]]]] = {
    "messages": messages_to_dialog,
    "alpaca": alpaca_to_dialog,
    "sharegpt": sharegpt_to_dialog,
    "oasst_trees": oasst_tree_to_dialog,
}


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points


def detect_format(path: str | os.PathLike) -> str:
    """Name of the dialog format of `path` (a key of CONVERTERS), from the keys of its first record."""
    record = first_record(path)
    keys = set(record) if isinstance(record, dict) else set()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "message_tree_id" in keys or ("prompt" in keys and isinstance(record["prompt"], dict)):
        return "oasst_trees"
    lists = [key for key in sorted(keys) if isinstance(record[key], list)]
    hint = (f"; is the file one JSON object holding the records under {', '.join(map(repr, lists))}? write that "
            "list as the file") if lists else ""
    raise ValueError(f"{os.fspath(path)}: unknown dialog format (first record keys: {sorted(keys)}); "
                     f"known formats: {', '.join(CONVERTERS)}{hint}")


def read_dialogs(
    path: str | os.PathLike, format: str = "auto", on_error: OnError = "raise"
) -> tuple[list[list[dict[str, str]]], ReadStats]:
    """Read `path` as dialogs ending with an assistant message; returns ``(dialogs, stats)``.

    format: "auto" or one of CONVERTERS. on_error: "raise" (ValueError naming file:line / file: record i) or
    "skip" (count in stats.skipped and log a warning).
    """
    if format == "auto":
        format = detect_format(path)
    if format not in CONVERTERS:
        raise ValueError(f"unknown dialog format {format!r}; known formats: auto, {', '.join(CONVERTERS)}")
    return convert_records(path, format, CONVERTERS[format], on_error)
