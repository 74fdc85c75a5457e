"""Loaders for the task YAMLs in this directory (lm-eval `custom_dataset`, called with the --metadata entries)."""

from __future__ import annotations

import json
import pathlib


def _path(value, key: str, task: str) -> pathlib.Path:
    if not value:
        raise ValueError(f"task {task} needs its data file: pass --metadata {key}=FILE")
    path = pathlib.Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task {task}: {key}={path} not found")
    return path


def read_piqa(path) -> list[dict]:
    """PIQA JSONL with labels: one {"goal", "sol1", "sol2", "label" (0 or 1)} per line."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                doc = {"goal": str(record["goal"]), "sol1": str(record["sol1"]), "sol2": str(record["sol2"]),
                       "label": int(record["label"])}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected a JSON object with goal, sol1, sol2, label ({e})") from None
            if doc["label"] not in (0, 1):
                raise ValueError(f"{path}:{number}: label is {doc['label']}, expected 0 or 1")
            docs.append(doc)
    if not docs:
        raise ValueError(f"{path} holds no PIQA records (the file is empty)")
    return docs


def read_paragraphs(path) -> list[dict]:
    """A text file as documents {"text"}: paragraphs separated by blank lines (empty ones dropped)."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    docs = [{"text": p.strip("\n")} for p in text.split("\n\n") if p.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text to score (the file is empty or only blank lines)")
    return docs


def piqa(piqa_path=None, **_):
    import datasets

    return datasets.DatasetDict(
        {"validation": datasets.Dataset.from_list(read_piqa(_path(piqa_path, "piqa_path", "piqa_local")))})


def paragraphs(text_path=None, **_):
    import datasets

    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(read_paragraphs(_path(text_path, "text_path", "text_perplexity")))})
