"""The trainers' JSON and JSONL outputs (samples, SFT pools and records, evaluation summaries, early-stopping logs):
one writer each. Process 0 writes; the directory is created; UTF-8 with non-ASCII text as is; written to a
temporary file and renamed, so a kill leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import jax


def _replace(path: str, text_parts: Iterable[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(text_parts)
    os.replace(path + ".tmp", path)


def write_jsonl(path, records: Iterable[dict]) -> None:
    """One JSON object per line."""
    if jax.process_index() == 0:
        _replace(os.fspath(path), (json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path, value: Any) -> None:
    if jax.process_index() == 0:
        _replace(os.fspath(path), [json.dumps(value, indent=2, ensure_ascii=False) + "\n"])


def read_json(path, default: Any = None) -> Any:
    """The file's value, or `default` when there is no file."""
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)
