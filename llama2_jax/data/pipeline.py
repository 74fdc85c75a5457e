"""The pretraining input pipeline (Grain): split, shard, shuffle, tokenize, pack, batch; and fixed validation batches.

    documents ─split (fixed)─> train docs ─[process_index::process_count]─> shuffle(seed), new order each epoch
        └─> validation docs                                                 ─> repeat ─> tokenize (BOS ... EOS)
                                                                            ─> pack rows [T] ─> batch [B, T]

* Deterministic: the same documents, seed and process layout give the same batches, on any machine.
* Sharded by document: process p reads only the training documents with index % process_count == p (after the split),
  so processes never see the same document and each gets `global_batch // process_count` rows per step.
* Checkpointable: the train iterator is a Grain `DatasetIterator`; `get_state()` is a small JSON-serialisable dict and
  `set_state(state)` resumes with exactly the batches that would have come next (also usable with
  `grain.checkpoint.CheckpointHandler` in Orbax).
* Validation: a fixed fraction of documents, spread evenly over the source and independent of the training seed (so
  runs with different seeds are evaluated on the same text). Validation batches are a finite list, the same on every
  call; every process packs the same rows and takes its own slice of each global batch, so the union over processes is
  the whole set.

No worker processes are used (Grain `num_workers` 0); tokenization runs on a few prefetch threads, which does not change
the order of elements.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import numpy as np

from llama2_jax.data import packing
from llama2_jax.text.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


class _PackedRowsIterator(grain.DatasetIterator):
    """Greedy packer over a stream of token arrays; yields rows in the batch format (see `packing`).

    State = (parent state before the document being packed, offset of its next piece). That is exact at every row
    boundary, so restoring re-reads at most one document.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._doc: np.ndarray | None = None  # tokens of the document being packed, if any
        self._doc_state = parent.get_state()  # parent state before `_doc` was read
        self._offset = 0

    def _read_document(self) -> bool:
        self._doc_state = self._parent.get_state()
        try:
            self._doc = np.asarray(next(self._parent), dtype=np.int32)
        except StopIteration:
            return False
        self._offset = 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        row = packing.RowBuilder(self._seq_len)
        while row.free > 0:
            if self._doc is None and not self._read_document():
                if row.empty:
                    raise StopIteration
                break
            piece = packing.next_piece(len(self._doc), self._offset, row.free)
            if piece is None:
                break
            end, next_offset = piece
            row.add(self._doc[self._offset : end], np.ones(end - self._offset, np.float32))
            self._offset = next_offset
            if self._offset == len(self._doc):
                self._doc = None
        return row.finish()

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_state, "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"] > 0:  # re-read the document that was being packed and skip its packed part
            self._read_document()
            self._offset = int(state["offset"])


class RowsDataset(grain.IterDataset):
    """A Grain dataset of rows of length `seq_len` (dicts of [T] arrays) made from its parent's elements by
    `iterator_class(parent iterator, seq_len)`, which owns the packing and its checkpointable state."""
    iterator_class: type[grain.DatasetIterator]

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return self.iterator_class(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"{type(self).__name__}(seq_len={self._seq_len})"


class PackedRowsDataset(RowsDataset):
    """Packs a Grain dataset of token arrays [n] into rows of length `seq_len`."""
    iterator_class = _PackedRowsIterator


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """BOS + SentencePiece(text) + EOS, as int32 [n]."""
    return np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)


class _DocumentView(Sequence):
    """Documents `documents[(stride * (start + j)) % n]` for j in [0, length): a lazy, fixed subset of a sequence."""
    def __init__(self, documents: Sequence[Any], stride: int, start: int, length: int):
        self._documents, self._stride, self._start, self._length = documents, stride, start, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, j: int):
        if not 0 <= j < self._length:
            raise IndexError(f"index {j} out of range for {self._length} documents")
        return self._documents[(self._stride * (self._start + j)) % len(self._documents)]


def _golden_stride(n: int) -> int:
    """A multiplier coprime with n near n / golden ratio: i -> stride * i mod n is then a permutation that spreads."""
    stride = max(1, round(n * 0.6180339887498949))
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


def split_documents(documents: Sequence[Any], val_fraction: float) -> tuple[Sequence[Any], Sequence[Any]]:
    """Splits documents into (train, validation) views: lazy, so this works for large TFDS sources too.

    Documents are taken in the fixed order i -> (stride * i) mod n (a golden-ratio stride), and the last
    `val_fraction` of that order (at least one document when val_fraction > 0) is the validation set. The validation
    documents are thus spread evenly over the source, so ordered sources (books, sorted topics) still give a
    representative split. It is the same for every seed and every epoch.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(documents)
    if n == 0:
        raise ValueError("the corpus is empty: no documents to train on")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training documents out of {n}")
    stride = _golden_stride(n)
    return _DocumentView(documents, stride, 0, n - n_val), _DocumentView(documents, stride, n - n_val, n_val)


def resolve_processes(global_batch: int, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, rows per process); defaults come from JAX. Raises if the batch does not divide."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not a positive multiple of the process count {process_count}")
    return process_index, process_count, global_batch // process_count


def make_train_dataset(
    train_docs: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    local_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    read_threads: int = 2,
) -> grain.IterDataset:
    """Training batches for one process: dicts of [local_batch, seq_len] arrays (see `packing`), forever by default.

    Each epoch reshuffles this process's documents (Grain folds the epoch into the seed). With a finite `num_epochs`
    the last incomplete batch is dropped.
    """
    # The documents are a plain sequence (not a Grain dataset) so that Grain's per-epoch reshuffling below cannot reach
    # back into the fixed train/validation split.
    shard = grain.MapDataset.source(train_docs)[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} has no training documents (only {len(train_docs)} in all)"
        )
    ds = shard.shuffle(seed=seed % 2**32).repeat(num_epochs)
    ds = ds.map(functools.partial(encode_document, tokenizer))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 8 * read_threads)))
    return PackedRowsDataset(ds, seq_len).batch(local_batch, drop_remainder=True)


def make_eval_batches(
    val_docs: Iterable[str],
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> list[Batch]:
    """Validation batches for one process: a list of dicts of [global_batch // process_count, seq_len] arrays.

    `val_docs` is a sequence or a re-iterable stream (e.g. `hf_source.StreamingDocuments`). All validation documents
    are packed in a fixed order (up to `max_batches` global batches); the last batch is filled
    with padding rows (loss_mask 0). Process p takes rows [p*L, (p+1)*L) of every global batch of L*process_count rows.
    """
    process_index, process_count, local = resolve_processes(global_batch, process_index, process_count)
    tokens = (encode_document(tokenizer, doc) for doc in val_docs)
    rows = packing.iter_packed_rows(((t, None) for t in tokens), seq_len)
    if max_batches is not None:
        rows = (row for _, row in zip(range(max_batches * global_batch), rows))
    rows = list(rows)
    rows += [packing.empty_row(seq_len)] * (-len(rows) % global_batch)
    mine = slice(process_index * local, (process_index + 1) * local)
    return [packing.stack_rows(rows[b : b + global_batch][mine], seq_len) for b in range(0, len(rows), global_batch)]


def make_pretrain_iterators(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch: int,
    seed: int,
    val_fraction: float = 0.05,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    max_eval_batches: int | None = None,
    read_threads: int = 2,
) -> tuple[grain.DatasetIterator, Callable[[], list[Batch]]]:
    """The pretraining data for this process, from a sequence of documents (see `sources.load_documents`).

    Args:
      documents: random-access sequence of document strings.
      tokenizer: SentencePiece tokenizer; every document becomes BOS + tokens + EOS.
      seq_len: T, tokens per row.
      global_batch: rows per step over all processes; must be divisible by `process_count`.
      seed: shuffle seed of the training documents.
      val_fraction: share of documents held out for validation (0 disables validation).
      process_index, process_count: this process and the number of processes (default: `jax.process_index()`,
        `jax.process_count()`); passed explicitly to simulate several hosts in tests.
      max_eval_batches: cap on validation batches (default: all validation documents).
      read_threads: threads that tokenize ahead of the packer (order is unaffected).

    Returns:
      (train_iter, eval_batches): `next(train_iter)` is a dict of [global_batch // process_count, T] arrays, forever;
      `train_iter.get_state()` / `set_state()` save and restore the position. `eval_batches()` returns the same list of
      validation batches (same shapes) on every call; it is built on first use.
    """
    process_index, process_count, local_batch = resolve_processes(global_batch, process_index, process_count)
    train_docs, val_docs = split_documents(documents, val_fraction)
    train = make_train_dataset(
        train_docs, tokenizer, seq_len, local_batch, seed, process_index, process_count, read_threads=read_threads
    )

    @functools.cache
    def cached_eval_batches() -> list[Batch]:
        return make_eval_batches(
            val_docs, tokenizer, seq_len, global_batch, process_index, process_count, max_batches=max_eval_batches
        )

    def eval_batches() -> list[Batch]:
        return list(cached_eval_batches())

    return iter(train), eval_batches



def make_stream_pretrain_iterators(
    train_docs: grain.IterDataset,
    val_docs: Iterable[str] | None,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    max_eval_batches: int | None = None,
) -> tuple[grain.DatasetIterator, Callable[[], list[Batch]]]:
    """`make_pretrain_iterators` for a corpus read as a stream (`hf_source.streaming_documents`): same batches format,
    same `get_state()`/`set_state()` exactness. The stream is neither split nor shuffled here (the stream does both);
    with several processes each takes its own slice of every global batch. `val_docs` None: no validation batches.
    """
    process_index, process_count, local_batch = resolve_processes(global_batch, process_index, process_count)
    tokens = train_docs.map(functools.partial(encode_document, tokenizer))
    rows = PackedRowsDataset(tokens, seq_len).batch(global_batch, drop_remainder=True)
    mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
    train = rows.map(lambda batch: {name: value[mine] for name, value in batch.items()})

    @functools.cache
    def cached_eval_batches() -> list[Batch]:
        if val_docs is None:
            return []
        return make_eval_batches(
            val_docs, tokenizer, seq_len, global_batch, process_index, process_count, max_batches=max_eval_batches
        )

    def eval_batches() -> list[Batch]:
        return list(cached_eval_batches())

    return iter(train), eval_batches
