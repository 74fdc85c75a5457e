"""Document sources for pretraining: plain text, JSONL, TFDS, Hugging Face datasets, and an embedded default corpus.

Every reader returns a random-access sequence of documents (`str`), which is what `pipeline.py` and Grain's
`MapDataset.source` expect. Errors are one line and name the path (and the line for JSONL).

| source    | what a document is                                                                                   |
| --------- | ---------------------------------------------------------------------------------------------------- |
| `default` | one help topic of CPython's own documentation (`pydoc_data.topics`); needs no file and no download    |
| `text`    | a paragraph: text files are split on blank lines (or one document per file with `one_doc_per_file`) |
| `jsonl`   | one JSON object per line; the document is its `field` (default "text")                               |
| `tfds`    | one example of a TFDS dataset read with `tfds.data_source` (ArrayRecord; TensorFlow not needed)       |
| `hf`      | the `field` of one row of a Hugging Face `datasets` dataset (local file or directory, cached hub name) |

Streaming a `hf` corpus (not random access) is `hf_source.streaming_documents`.

Blank-line splitting is the default for text so that one big file (e.g. Tiny Shakespeare, one speech per paragraph)
still gives enough documents for a validation split and for shuffling.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

PathArg = str | os.PathLike | Sequence[str | os.PathLike]

# One or more blank lines (lines holding only spaces or tabs count as blank).
_PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")


def default_corpus() -> list[str]:
    """CPython's English help topics (`pydoc_data.topics.topics`), one document per topic, sorted by topic name.

    Why this corpus: it ships inside every CPython (the `help()` text of the reference manual), so the tiny
    configuration, the tests and the quickstart run on any machine with no download and no data file. It is real English
    prose mixed with code, about 0.5-0.7 MB depending on the Python version (~80 topics), stable within a Python
    release, and licensed under the PSF License. It is far too small to train a useful model; it exists to exercise the
    whole pipeline end to end.
    """
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

    return [topics[name] for name in sorted(topics) if topics[name].strip()]


def _expand_paths(paths: PathArg, suffix: str) -> list[pathlib.Path]:
    """Files named by `paths`: each item is a file, a directory (all `*<suffix>` files below it) or a glob pattern."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no input path given")
    files: list[pathlib.Path] = []
    for item in items:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
            if not found:
                raise FileNotFoundError(f"{path}: directory has no *{suffix} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(str(item)):
            found = sorted(pathlib.Path(p) for p in glob.glob(str(item), recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"{item}: glob pattern matches no files")
            files.extend(found)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def _read_nonempty(path: pathlib.Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


def split_paragraphs(text: str) -> list[str]:
    """Splits text on blank lines; drops empty paragraphs and the newlines around each one (inner text is kept)."""
    paragraphs = (p.strip("\n") for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")))
    return [p for p in paragraphs if p.strip()]


def read_text_files(paths: PathArg, *, one_doc_per_file: bool = False) -> list[str]:
    """Documents from UTF-8 text files (files, directories of `*.txt`, or glob patterns), in sorted file order.

    Each file is split on blank lines into paragraphs (one document each), or kept whole with `one_doc_per_file`.
    Raises FileNotFoundError for a missing path and ValueError for an empty file.
    """
    docs: list[str] = []
    for path in _expand_paths(paths, ".txt"):
        text = _read_nonempty(path)
        docs.extend([text] if one_doc_per_file else split_paragraphs(text))
    return docs


def _jsonl_document(line: str, where: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where}: record has no {field!r} field")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def read_jsonl(paths: PathArg, *, field: str = "text") -> list[str]:
    """Documents from JSONL files (one JSON object per line; the document is `record[field]`). Blank lines are skipped.

    Raises FileNotFoundError for a missing path, ValueError for an empty file, and ValueError naming `file:line` for a
    line that is not a JSON object with a string `field`.
    """
    docs: list[str] = []
    for path in _expand_paths(paths, ".jsonl"):
        for number, line in enumerate(_read_nonempty(path).splitlines(), start=1):
            if line.strip():
                docs.append(_jsonl_document(line, f"{path}:{number}", field))
    return docs


class _FieldSequence(Sequence[str]):
    """A random-access view of one text field of a TFDS data source; bytes are decoded as UTF-8 on access."""

    def __init__(self, source: Sequence[Any], field: str, name: str):
        self._source = source
        self._field = field
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):  # only int indices: Grain's MapDataset.source calls it that way
        if not 0 <= index < len(self._source):
            raise IndexError(f"{self._name}: index {index} out of range for {len(self._source)} records")
        record = self._source[index]
        if self._field not in record:
            raise ValueError(f"{self._name}[{index}]: record has no {self._field!r} field (has {sorted(record)})")
        value = record[self._field]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_documents(
    name: str, *, split: str = "train", field: str = "text", data_dir: str | None = None, download: bool = False
) -> Sequence[str]:
    """A lazy sequence of documents from `tfds.data_source(name, split=split)` (e.g. `"c4/en"`, `field="text"`).

    By default the dataset must already be prepared in ArrayRecord format under `data_dir` (or TFDS's default
    directory): preparing it is a separate, one-off step, not something every host of a training job should start.
    TensorFlow is not needed for reading. `tensorflow_datasets` is imported here only, so the rest of the package works
    without it.
    """
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError("source 'tfds' needs tensorflow-datasets and array-record: pip install -e .[tfds]") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as error:  # DatasetNotFoundError (with a list of every dataset), unknown split, missing files
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"tfds:{name}/{split}: {first_line}") from None
    return _FieldSequence(source, field, f"tfds:{name}/{split}")


def _load_default(path, **unused) -> Sequence[str]:
    del path, unused
    return default_corpus()


def _load_text(path, *, one_doc_per_file: bool = False, **unused) -> Sequence[str]:
    return read_text_files(path, one_doc_per_file=one_doc_per_file)


def _load_jsonl(path, *, field: str = "text", **unused) -> Sequence[str]:
    return read_jsonl(path, field=field)


def _load_tfds(path, *, field="text", split="train", data_dir=None, **unused) -> Sequence[str]:
    return tfds_documents(path, split=split, field=field, data_dir=data_dir)


def _load_hf(path, *, field="text", split="train", data_dir=None, **unused) -> Sequence[str]:
    from llama2_jax.data import hf_source  # pylint: disable=g-import-not-at-top  (datasets is optional)

    return hf_source.hf_documents(str(path), split=split, field=field, cache_dir=data_dir)


SOURCES: dict[str, Callable[..., Sequence[str]]] = {
    "default": _load_default,
    "text": _load_text,
    "jsonl": _load_jsonl,
    "tfds": _load_tfds,
    "hf": _load_hf,
}


def load_documents(
    source: str = "default",
    path: PathArg | None = None,
    *,
    field: str = "text",
    split: str = "train",
    data_dir: str | None = None,
    one_doc_per_file: bool = False,
) -> Sequence[str]:
    """Documents from one of `SOURCES` (plain arguments, so a trainer can pass its config fields straight through).

    Args:
      source: "default" (embedded corpus, `path` ignored), "text", "jsonl", "tfds" or "hf".
      path: files/directories/globs for "text" and "jsonl"; the dataset name (e.g. "c4/en") for "tfds"; a file,
        directory or cached hub name for "hf" (`hf_source.load_hf_dataset`).
      field: the text field of a JSONL record, TFDS example or HF row.
      split: TFDS / HF split (e.g. "train", "train[:1%]").
      data_dir: TFDS data directory; for "hf" the `datasets` cache directory ("" = HF_DATASETS_CACHE).
      one_doc_per_file: "text" only: a whole file is one document instead of one per paragraph.

    Returns:
      A non-empty random-access sequence of documents.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {sorted(SOURCES)}")
    if source != "default" and not path:
        raise ValueError(f"data source {source!r} needs a path (or a dataset name for 'tfds' and 'hf')")
    docs = SOURCES[source](path, field=field, split=split, data_dir=data_dir, one_doc_per_file=one_doc_per_file)
    if len(docs) == 0:
        raise ValueError(f"data source {source!r} ({path}) has no documents")
    return docs
