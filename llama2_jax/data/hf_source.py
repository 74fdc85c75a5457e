"""Hugging Face `datasets` as a data source: documents for pretraining (in memory or streamed) and records for SFT/RM.

`path` is what `datasets.load_dataset` takes as its first argument, resolved like this:

* a `.parquet`, `.json`/`.jsonl`, `.arrow`, `.csv` or `.txt` file: `load_dataset("parquet", data_files=path)` (the
  builder named by the suffix, `BUILDERS`);
* a directory: `load_dataset(path)`, which reads the data files in it (Parquet, JSON, Arrow, ...);
* anything else, e.g. `"allenai/c4"`: a hub name. With `HF_DATASETS_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) nothing is
  downloaded, so it must already be in the local cache (`HF_DATASETS_CACHE`, or `cache_dir`).

`datasets` is imported only here and only when used (the `[hf]` extra: `pip install -e .[hf]`).

Streaming (`streaming=True`) never loads the corpus into memory: `StreamingDocuments` wraps the `IterableDataset` in a
Grain `IterDataset` whose iterator state holds `IterableDataset.state_dict()` (shard and example position), so a
restored iterator yields exactly the documents that would have come next, like the random-access sources.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

# File suffix -> the `datasets` packaged builder that reads it.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv", ".txt": "text"}
INSTALL_HINT = "pip install -e .[hf]"


def _import_datasets():
    try:
        import datasets  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError(f"Hugging Face datasets is not installed: {INSTALL_HINT}") from None
    return datasets


def load_hf_dataset(path: str, *, split: str = "train", streaming: bool = False, cache_dir: str | None = None):
    """`datasets.load_dataset` for a local file, a local directory or a cached hub name (see the module docstring).

    Returns a `datasets.Dataset` (random access, memory-mapped Arrow) or, with `streaming`, an `IterableDataset`.
    Raises ValueError naming the path for anything `datasets` cannot load (missing file, unknown split, ...).
    """
    datasets = _import_datasets()
    local = pathlib.Path(path)
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming, "cache_dir": cache_dir or None}
    if local.is_file():
        builder = BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"hf:{path}: unknown file type {local.suffix!r}; expected one of {sorted(BUILDERS)}")
        args, kwargs["data_files"] = (builder,), str(local)
    else:
        args = (str(path),)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"hf:{path} (split {split!r}): {first_line}") from None


def _check_column(dataset, field: str, where: str) -> None:
    columns = dataset.column_names
    if columns is not None and field not in columns:
        raise ValueError(f"{where}: no {field!r} column (has {', '.join(columns)})")


def _as_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


class _ColumnSequence(Sequence[str]):
    """Random access to one string column of a `datasets.Dataset`, row by row (the Arrow table stays memory-mapped)."""

    def __init__(self, dataset, name: str, field: str):
        self._dataset, self._name, self._field = dataset.select_columns([field]), name, field

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):  # only int indices: Grain's MapDataset.source calls it that way
        if not 0 <= index < len(self._dataset):
            raise IndexError(f"{self._name}: index {index} out of range for {len(self._dataset)} rows")
        return _as_text(self._dataset[int(index)][self._field], f"{self._name}[{index}]", self._field)


def hf_documents(path: str, *, split: str = "train", field: str = "text", cache_dir: str | None = None
                 ) -> Sequence[str]:
    """A random-access sequence of the `field` strings of a dataset loaded with `load_hf_dataset` (not streaming)."""
    name = f"hf:{path}/{split}"
    dataset = load_hf_dataset(path, split=split, cache_dir=cache_dir)
    _check_column(dataset, field, name)
    return _ColumnSequence(dataset, name, field)


# ---------------------------------------------------------------------------------------------------------- streaming


def holdout_every(val_fraction: float) -> int:
    """k such that every k-th streamed document (index % k == k - 1) is held out for validation; 0 = no validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return 0 if val_fraction == 0 else max(2, round(1.0 / val_fraction))


def _is_validation(index: int, every: int) -> bool:
    return every > 0 and index % every == every - 1


class _StreamIterator(grain.DatasetIterator):
    """Documents of one role ("train" or "val") of a stream, shuffled within windows, repeated for `num_epochs`.

    State = (epoch, stream position and document index at the start of the current window, window number, offset in
    the window). Restoring re-reads that one window, so it is exact and costs at most `window` documents.
    """

    def __init__(self, stream: "StreamingDocuments"):
        super().__init__()
        self._s = stream
        self._start_window(epoch=0, position=None, index=0, number=0)

    def _start_window(self, epoch: int, position: dict | None, index: int, number: int, live=None) -> None:
        """`live`: the (dataset, iterator) pair already at `position`, or None to open the stream there."""
        self._epoch, self._position, self._index, self._number = epoch, position, index, number
        self._live = live
        self._window: list[str] = []
        self._offset = 0
        self._filled = False

    def _open(self):
        dataset = self._s.make_dataset()
        if self._position is not None:
            dataset.load_state_dict(self._position)
        return dataset, iter(dataset)

    def _fill(self) -> None:
        """Reads the next window of documents of this role; at the end of the stream starts the next epoch."""
        s = self._s
        dataset, examples = self._live or self._open()
        index, window = self._index, []
        while len(window) < s.window:
            try:
                record = next(examples)
            except StopIteration:
                break
            if _is_validation(index, s.every) == (s.role == "val"):
                window.append(_as_text(record.get(s.field), f"{s.name}[{index}]", s.field))
            index += 1
        self._next_position = dataset.state_dict()
        self._next_index = index
        self._next_live = (dataset, examples)
        self._exhausted = len(window) < s.window
        if s.shuffle and window:
            order = np.random.default_rng([s.seed, self._epoch, self._number]).permutation(len(window))
            window = [window[i] for i in order]
        self._window, self._filled = window, True

    def __next__(self) -> str:
        s = self._s
        while True:
            if not self._filled:
                self._fill()
            if self._offset < len(self._window):
                doc = self._window[self._offset]
                self._offset += 1
                return doc
            if not self._exhausted:
                self._start_window(self._epoch, _copy(self._next_position), self._next_index, self._number + 1,
                                   live=self._next_live)
            elif self._number == 0 and not self._window:
                raise ValueError(f"{s.name}: the stream has no {s.role} documents")
            elif s.num_epochs is not None and self._epoch + 1 >= s.num_epochs:
                raise StopIteration
            else:
                self._start_window(self._epoch + 1, None, 0, 0)

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": _copy(self._position), "index": self._index,
                "window": self._number, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._start_window(int(state["epoch"]), _copy(state["position"]), int(state["index"]), int(state["window"]))
        self._offset = int(state["offset"])


def _copy(position: dict | None) -> dict | None:
    """A JSON round trip: the checkpoint stores the state as JSON, and a copy cannot change under the iterator."""
    return None if position is None else json.loads(json.dumps(position))


class StreamingDocuments(grain.IterDataset):
    """The training or validation documents of a streamed dataset as a Grain `IterDataset` of `str`.

    Args:
      make_dataset: returns a fresh `datasets.IterableDataset` (called at every epoch and on restore).
      field: the text column.
      role: "train" (documents not held out) or "val" (every `every`-th document, see `holdout_every`).
      every: hold-out period from `holdout_every` (0 = none held out).
      window: documents per shuffle window (streams cannot be shuffled globally; 1 = stored order).
      seed: shuffle seed; each epoch and window gets its own permutation.
      num_epochs: passes over the stream (None = forever).
      name: shown in error messages.
    """

    def __init__(self, make_dataset: Callable[[], Any], *, field: str = "text", role: str = "train", every: int = 0,
                 window: int = 1024, seed: int = 0, num_epochs: int | None = None, name: str = "hf"):
        super().__init__()
        if role not in ("train", "val"):
            raise ValueError(f"role must be 'train' or 'val', got {role!r}")
        if window < 1:
            raise ValueError(f"shuffle window must be at least 1, got {window}")
        self.make_dataset, self.field, self.role, self.every = make_dataset, field, role, every
        self.window, self.shuffle, self.num_epochs, self.name = window, window > 1, num_epochs, name
        self.seed = seed % 2**32

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self)

    def one_pass(self) -> "StreamingDocuments":
        """The same documents read once, in stored order (e.g. to train a tokenizer on)."""
        return StreamingDocuments(self.make_dataset, field=self.field, role=self.role, every=self.every, window=1,
                                  num_epochs=1, name=self.name)

    def __str__(self) -> str:
        return f"StreamingDocuments({self.name}, role={self.role}, window={self.window})"


def streaming_documents(path: str, *, split: str = "train", field: str = "text", val_fraction: float = 0.0,
                        window: int = 1024, seed: int = 0, cache_dir: str | None = None
                        ) -> tuple[StreamingDocuments, StreamingDocuments | None]:
    """(train, validation) document streams of `load_hf_dataset(path, streaming=True)`; validation is None when
    `val_fraction` is 0. Every `holdout_every(val_fraction)`-th document of the stream is held out (a fixed rule,
    independent of the seed); the validation stream is read once, in stored order."""
    name = f"hf:{path}/{split}"
    every = holdout_every(val_fraction)

    def make_dataset():
        return load_hf_dataset(path, split=split, streaming=True, cache_dir=cache_dir)

    _check_column(make_dataset(), field, name)
    train = StreamingDocuments(make_dataset, field=field, role="train", every=every, window=window, seed=seed,
                               name=name)
    val = None if every == 0 else StreamingDocuments(make_dataset, field=field, role="val", every=every, window=1,
                                                     num_epochs=1, name=name)
    return train, val


# ---------------------------------------------------------------------------------------------------------- records


def iter_hf_records(path: str, split: str = "train", cache_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` for every row of a dataset (streamed: a row at a time, plain Python values)."""
    for i, record in enumerate(load_hf_dataset(path, split=split, streaming=True, cache_dir=cache_dir)):
        yield f"hf:{path}@{split}: record {i}", record
