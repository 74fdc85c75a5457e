"""The human-in-the-loop annotator: pairs are exported to JSONL, people label them elsewhere, the labels are imported.

`FileAnnotator(directory)` keeps four JSONL files there:

  exported.jsonl  every pair ever exported (append-only): {"pair_id", "prompt": [messages], "answer_a", "answer_b",
                  "is_safety", "meta"}. Exporting a pair again is a no-op; another pair under a known id is refused.
  pending.jsonl   rewritten by `export` and `label`: the exported pairs that have no label yet, each with empty label
                  fields to fill in: "preferred": "a" | "b", "rating": one of RATINGS (spaces or hyphens for
                  underscores, any case; "unsure" = "negligibly_better"), "safe_a" / "safe_b": true | false (safety
                  prompts; null = not labelled).
  labels.jsonl    the people's labels (e.g. pending.jsonl filled in and saved under this name; lines whose
                  "preferred" is still null are skipped). `label` imports it when present.
  imported.jsonl  every label imported so far, with the file:line it came from.

Importing is resumable: labels imported earlier are kept whether or not a later labels file repeats them; a line
repeating an imported label is skipped; a line that changes one is refused (edit imported.jsonl to change a
verdict). A file is imported whole or not at all. A label for a pair that was never exported, an unknown field (a
misspelt "prefered"), or a copy of the pair's prompt or answers that differs from the export is refused with a
one-line ValueError naming the file and line.

`label(pairs)` exports the pairs, imports labels.jsonl and returns their labels; while some have none it raises
`LabelsPending` (one line: how many, and where to write them), so a program can stop and be run again once they are
labelled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from llama2_jax.data.dialogs import InvalidJson, convert_records, iter_records, require_dict
from llama2_jax.rlhf.annotators import ComparisonPair, Label

PAIR_FIELDS = ("pair_id", "prompt", "answer_a", "answer_b", "is_safety", "meta")
LABEL_FIELDS = ("preferred", "rating", "safe_a", "safe_b")


class LabelsPending(Exception):
    """Some pairs have no label yet (the message says how many and which file to fill in)."""


def pair_record(pair: ComparisonPair) -> dict[str, Any]:
    return {"pair_id": pair.pair_id, "prompt": pair.prompt, "answer_a": pair.answer_a, "answer_b": pair.answer_b,
            "is_safety": pair.is_safety, "meta": pair.meta}


def label_record(label: Label) -> dict[str, Any]:
    return {"pair_id": label.pair_id, **{name: getattr(label, name) for name in LABEL_FIELDS}}


def _write_jsonl(path: str, records) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_exported(path: str) -> dict[str, ComparisonPair]:
    """{pair_id: pair} of an export file (ValueError "<file>:<line>: ..." for a malformed record)."""
    if not os.path.exists(path):
        return {}

    def convert(record):
        record = require_dict(record, *PAIR_FIELDS[:4])
        return ComparisonPair(record["pair_id"], record["prompt"], record["answer_a"], record["answer_b"],
                              record.get("is_safety", False), record.get("meta") or {})

    return {pair.pair_id: pair for pair in convert_records(path, "exported pairs", convert, "raise")[0]}


class _Imported(NamedTuple):
    """An imported label with the file:line it came from."""
    label: Label
    source: str


def _label_converter(exported: dict[str, ComparisonPair], export_path: str):
    """Record of a labels file -> (Label, None) or None for a line not labelled yet; ValueError for a bad one."""
    known = set(PAIR_FIELDS) | set(LABEL_FIELDS)

    def convert(record):
        record = require_dict(record, "pair_id")
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; a label has "
                             f"{', '.join(('pair_id',) + LABEL_FIELDS)}")
        pair = exported.get(record["pair_id"])
        if pair is None:
            raise ValueError(f"pair_id {record['pair_id']!r} was not exported (not in {export_path})")
        exported_record = pair_record(pair)
        for name in ("prompt", "answer_a", "answer_b", "is_safety"):
            if name in record and record[name] != exported_record[name]:
                raise ValueError(f"'{name}' differs from the exported pair {pair.pair_id!r} in {export_path}")
        if record.get("preferred") is None:
            if any(record.get(name) is not None for name in LABEL_FIELDS):
                raise ValueError("a label without 'preferred' (\"a\" or \"b\")")
            return None
        return Label(pair.pair_id, record["preferred"], record.get("rating"), record.get("safe_a"),
                     record.get("safe_b"))

    return convert


class FileAnnotator:
    """Export pairs, import people's labels (see the module docstring for the files and rules)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.exported_path = os.path.join(self.directory, "exported.jsonl")
        self.pending_path = os.path.join(self.directory, "pending.jsonl")
        self.labels_path = os.path.join(self.directory, "labels.jsonl")
        self.imported_path = os.path.join(self.directory, "imported.jsonl")

    # -------------------------------------------------------------------------------------------------- state

    def exported(self) -> dict[str, ComparisonPair]:
        return read_exported(self.exported_path)

    def imported(self) -> dict[str, Label]:
        """{pair_id: Label} imported so far."""
        return {pair_id: entry.label for pair_id, entry in self._imported().items()}

    def _imported(self) -> dict[str, _Imported]:
        if not os.path.exists(self.imported_path):
            return {}

        def convert(record):
            record = require_dict(record, "pair_id", "preferred", "rating", "source")
            return _Imported(Label(record["pair_id"], record["preferred"], record["rating"], record.get("safe_a"),
                                   record.get("safe_b")), record["source"])

        entries = convert_records(self.imported_path, "imported labels", convert, "raise")[0]
        return {entry.label.pair_id: entry for entry in entries}

    def pending(self) -> list[ComparisonPair]:
        """Exported pairs without a label, in export order."""
        imported = self.imported()
        return [pair for pair_id, pair in self.exported().items() if pair_id not in imported]

    # ------------------------------------------------------------------------------------------ export / import

    def export(self, pairs: Sequence[ComparisonPair]) -> int:
        """Append the pairs not exported yet to exported.jsonl and rewrite pending.jsonl; returns how many were new.
        A pair_id already exported with other content is a ValueError (nothing is written)."""
        exported = self.exported()
        new = {}
        for pair in pairs:
            known = exported.get(pair.pair_id) or new.get(pair.pair_id)
            if known is None:
                new[pair.pair_id] = pair
            elif pair_record(known) != pair_record(pair):
                raise ValueError(f"pair {pair.pair_id!r} was exported to {self.exported_path} with other content; "
                                 "pair ids must be unique")
        os.makedirs(self.directory, exist_ok=True)
        if new:
            _write_jsonl(self.exported_path, map(pair_record, [*exported.values(), *new.values()]))
        self._write_pending()
        return len(new)

    def _write_pending(self) -> None:
        empty = dict.fromkeys(LABEL_FIELDS)
        _write_jsonl(self.pending_path, ({**pair_record(pair), **empty} for pair in self.pending()))

    def import_labels(self, path: str | os.PathLike | None = None) -> int:
        """Import a labels file (default labels.jsonl) into imported.jsonl, whole or not at all; returns how many
        labels were new. Errors: ValueError("<file>:<line>: ...") (see the module docstring)."""
        path = os.fspath(path or self.labels_path)
        exported = self.exported()
        entries = self._imported()
        new = 0
        seen: dict[str, tuple[Label, str]] = {}
        convert = _label_converter(exported, self.exported_path)
        for location, record in iter_records(path):
            try:
                if isinstance(record, InvalidJson):
                    raise ValueError(f"invalid JSON ({record.error})")
                label = convert(record)
            except ValueError as err:
                raise ValueError(f"{location}: {err}") from None
            if label is None:
                continue
            earlier = entries.get(label.pair_id)
            if earlier is None and label.pair_id in seen and seen[label.pair_id][0] != label:
                raise ValueError(f"{location}: pair {label.pair_id!r} is labelled differently at "
                                 f"{seen[label.pair_id][1]}")
            if earlier is not None and earlier.label != label:
                raise ValueError(f"{location}: the label of pair {label.pair_id!r} differs from the one imported "
                                 f"from {earlier.source}; edit {self.imported_path} to change it")
            if earlier is None and label.pair_id not in seen:
                seen[label.pair_id] = (label, location)
                new += 1
        if new:
            records = [{**label_record(e.label), "source": e.source} for e in entries.values()]
            records += [{**label_record(label), "source": location} for label, location in seen.values()]
            _write_jsonl(self.imported_path, records)
            self._write_pending()
        return new

    def label(self, pairs: Sequence[ComparisonPair]) -> list[Label]:
        """Export the pairs, import labels.jsonl when present and return the pairs' labels in order; LabelsPending
        while some have none."""
        self.export(pairs)
        if os.path.exists(self.labels_path):
            self.import_labels()
        imported = self.imported()
        missing = [pair.pair_id for pair in pairs if pair.pair_id not in imported]
        if missing:
            raise LabelsPending(f"{len(missing)} of {len(pairs)} pairs have no label yet: fill in "
                                f"{self.pending_path} and save it as {self.labels_path}, then run again")
        return [dataclasses.replace(imported[pair.pair_id]) for pair in pairs]
