"""Supervised fine-tuning data (paper section 3.1): dialogs -> (tokens, loss mask) -> packed rows -> Grain batches;
eval split.

    file ─read_sft_samples─> (dialog, train_on) ─split (fixed)─> train / held-out dialogs
         ─encode_dialog_for_training─> (tokens, mask) ─fit_to_length (overlong)─> samples <= seq_len
         ─shuffle(seed), new order each epoch, repeat─> pack WHOLE samples into rows [T] ─> batch [B, T]

* Loss mask: `chat.encode_dialog_for_training` marks the assistant-output tokens (answer + "▁" + EOS) of every turn
  ("all": the paper zeroes the loss on prompt tokens, section 3.1) or of the last turn only ("last": Ghost
  Attention records, section 3.3).
  A record may carry `"train_on": "all" | "last"` next to its messages (any format; default "all").
* Packing (paper section 3.1: prompts and answers are concatenated to fill the 4096-token sequences): samples are packed
  greedily into rows with segment ids and positions restarting at 0 per sample (`packing.RowBuilder`); attention and
  targets never cross samples. Unlike pretraining, a sample is never split across rows: one that does not fit in the
  free space starts the next row (the free space is padding, loss 0), so every answer sees its whole prompt.
* Overlong samples (more than seq_len tokens) are never silent; they are counted in `SFTStats` and logged:
    "truncate": keep the longest prefix of whole turns that fits and still has a supervised token; if none (the first
                turn alone is too long, or a "last"-only sample whose last turn does not fit) cut at seq_len tokens
                (the answer then has no EOS); a sample left with no supervised token is dropped.
    "drop":     drop the sample.
* Held-out split: a fixed fraction of dialogs spread over the file, independent of the seed and of seq_len
  (`pipeline.split_documents`). Eval batches pack the held-out samples in file order; the last batch is filled with
  padding rows (loss_mask 0).
* The train iterator is a Grain `DatasetIterator`: `get_state()` is a small JSON dict and `set_state()` resumes with
  exactly the batches that would have come next. It yields *global* batches; trainers slice rows per process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from llama2_jax.data import dialogs as dialog_readers
from llama2_jax.data import packing
from llama2_jax.data.pipeline import RowsDataset, split_documents
from llama2_jax.text import chat_format as chat

Batch = dict[str, np.ndarray]
Example = tuple[np.ndarray, np.ndarray]  # tokens int32 [n], weights float32 [n]: weight of predicting tokens[i]
Sample = tuple[list, str]  # (dialog, train_on)
OVERLONG = ("truncate", "drop")
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ reading


def _record_train_on(record: Any) -> str:
    train_on = record.get("train_on", "all") if isinstance(record, dict) else "all"
    if train_on not in chat.TRAIN_ON:
        raise ValueError(f"'train_on' is {train_on!r}, expected one of {', '.join(chat.TRAIN_ON)}")
    return train_on


def read_sft_samples(path, format: str = "auto", on_error: str = "raise"
                     ) -> tuple[list[Sample], dialog_readers.ReadStats]:
    """`dialogs.read_dialogs` that also honours a per-record `"train_on": "all" | "last"` (default "all").

    Returns ([(dialog, train_on)], ReadStats). Malformed records raise or are skipped as in `read_dialogs`.
    """
    if format == "auto":
        format = dialog_readers.detect_format(path)
    if format not in dialog_readers.CONVERTERS:
        raise ValueError(f"unknown dialog format {format!r}; known formats: auto, "
                         f"{', '.join(dialog_readers.CONVERTERS)}")
    convert = dialog_readers.CONVERTERS[format]
    return dialog_readers.convert_records(path, format, lambda r: (convert(r), _record_train_on(r)), on_error)


# ----------------------------------------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class SFTStats:
    """What the SFT pipeline did with a file. Sample counts cover train and held-out samples together."""
    path: str = ""
    format: str = ""
    records: int = 0  # records read from the file
    skipped: int = 0  # malformed records skipped (on_error="skip")
    reader_dropped: int = 0  # well-formed records that give no dialog by a reader rule
    dialogs: int = 0  # dialogs read
    train_dialogs: int = 0
    eval_dialogs: int = 0
    overlong: int = 0  # samples longer than seq_len
    truncated_to_turns: int = 0  # overlong samples shortened to whole turns
    truncated_mid_turn: int = 0  # overlong samples cut at seq_len tokens
    dropped_overlong: int = 0  # overlong samples dropped (overlong="drop", or nothing supervised left)
    dropped_unsupervised: int = 0  # samples with no supervised token at all
    special_tags: int = 0  # dialogs with [INST], [/INST], <<SYS>> or <</SYS>> inside a message (trained on as text)
    train_samples: int = 0
    eval_samples: int = 0
    seq_len: int = 0
    train_rows: int = 0  # rows of one epoch packed in file order (a shuffled epoch differs by a few rows)
    eval_rows: int = 0
    tokens: int = 0  # real (non-padding) tokens in those train rows
    supervised_tokens: int = 0  # targets with loss weight > 0 in those train rows

    @property
    def supervised_fraction(self) -> float:
        """Share of the real train tokens whose prediction is trained (assistant tokens)."""
        return self.supervised_tokens / max(self.tokens, 1)

    @property
    def fill(self) -> float:
        """Share of the train row slots holding real tokens (the rest is padding)."""
        return self.tokens / max(self.train_rows * self.seq_len, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "supervised_fraction": self.supervised_fraction, "fill": self.fill}

    def dropped_summary(self) -> str:
        """The counts that explain an empty training split (train and held-out samples together)."""
        return (f"{self.train_dialogs} train, {self.eval_dialogs} held out; {self.overlong} samples longer than "
                f"seq_len {self.seq_len} "
                f"({self.truncated_to_turns} truncated to whole turns, {self.truncated_mid_turn} cut mid-turn, "
                f"{self.dropped_overlong} dropped), {self.dropped_unsupervised} without supervised tokens dropped")

    def summary(self) -> str:
        return (f"{self.path}: {self.dialogs} dialogs ({self.train_dialogs} train, {self.eval_dialogs} held out; "
                f"{self.skipped} malformed skipped, {self.reader_dropped} dropped by reader rules); "
                f"{self.overlong} longer than {self.seq_len} tokens: {self.truncated_to_turns} truncated to whole "
                f"turns, {self.truncated_mid_turn} cut mid-turn, {self.dropped_overlong} dropped; "
                f"{self.dropped_unsupervised} without supervised tokens dropped; {self.special_tags} with special "
                f"tags in a message; {self.train_samples} train samples "
                f"in {self.train_rows} rows per epoch ({self.fill:.1%} filled), {self.eval_samples} eval samples in "
                f"{self.eval_rows} rows; supervised tokens {self.supervised_tokens} of {self.tokens} "
                f"({self.supervised_fraction:.1%})")


def _supervised(weights: np.ndarray) -> bool:
    return bool(np.any(weights[1:] > 0))  # weights[0] (the first token) is never predicted


def fit_to_length(tokens: np.ndarray, weights: np.ndarray, seq_len: int, bos_id: int,
                  overlong: str) -> tuple[Example | None, str]:
    """A sample cut to at most `seq_len` tokens, and what happened: "fits", "turns", "mid_turn" or "dropped".

    "truncate" keeps the longest whole-turn prefix (turns start at BOS) with a supervised token, else the first
    `seq_len` tokens if they have one; "drop" drops every overlong sample. (None, "dropped") when nothing is kept.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}, expected one of {', '.join(OVERLONG)}")
    if len(tokens) <= seq_len:
        return (tokens, weights), "fits"
    if overlong == "drop":
        return None, "dropped"
    turn_starts = [i for i in np.flatnonzero(tokens == bos_id) if 0 < i <= seq_len]
    for end in reversed(turn_starts):
        if _supervised(weights[:end]):
            return (tokens[:end], weights[:end]), "turns"
    if _supervised(weights[:seq_len]):
        return (tokens[:seq_len], weights[:seq_len]), "mid_turn"
    return None, "dropped"


_OUTCOME_FIELD = {"turns": "truncated_to_turns", "mid_turn": "truncated_mid_turn", "dropped": "dropped_overlong"}


def encode_samples(tokenizer, samples: Iterable[Sample], seq_len: int, overlong: str,
                   stats: SFTStats) -> list[Example]:
    """(dialog, train_on) -> (tokens, weights) of at most seq_len tokens; overlong and unsupervised ones counted."""
    examples = []
    for dialog, train_on in samples:
        tokens, mask = chat.encode_dialog_for_training(tokenizer, dialog, train_on=train_on)
        tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.float32)
        if not _supervised(mask):
            stats.dropped_unsupervised += 1
            continue
        example, outcome = fit_to_length(tokens, mask, seq_len, tokenizer.bos_id, overlong)
        if outcome != "fits":
            stats.overlong += 1
            field = _OUTCOME_FIELD[outcome]
            setattr(stats, field, getattr(stats, field) + 1)
        if example is not None:
            examples.append(example)
    return examples


# ------------------------------------------------------------------------------------------------------------ packing


def iter_whole_sample_rows(examples: Iterable[Example], seq_len: int) -> Iterator[Batch]:
    """Greedy packing that never splits a sample (each at most seq_len tokens): rows in the batch format."""
    row = packing.RowBuilder(seq_len)
    for tokens, weights in examples:
        if len(tokens) > seq_len:
            raise ValueError(f"a sample has {len(tokens)} tokens, more than seq_len={seq_len}; fit it first")
        if len(tokens) > row.free:
            yield row.finish()
            row = packing.RowBuilder(seq_len)
        row.add(tokens, weights)
    if not row.empty:
        yield row.finish()


class _WholeSamplePackIterator(grain.DatasetIterator):
    """Packs a stream of examples into rows without splitting any. State = the parent's state before the example
    that is read but not yet placed (if any), so a restore re-reads at most one example."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pending: Example | None = None
        self._pending_state = None

    def _peek(self) -> Example | None:
        if self._pending is None:
            state = self._parent.get_state()
            try:
                self._pending = next(self._parent)
            except StopIteration:
                return None
            self._pending_state = state
        return self._pending

    def __next__(self) -> Batch:
        row = packing.RowBuilder(self._seq_len)
        while (example := self._peek()) is not None and len(example[0]) <= row.free:
            row.add(*example)
            self._pending = None
        if row.empty:
            raise StopIteration
        return row.finish()

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None


class WholeSamplePackDataset(RowsDataset):
    """Rows of length `seq_len` from a Grain dataset of (tokens, weights) examples, whole samples per row."""
    iterator_class = _WholeSamplePackIterator


def make_train_iterator(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int,
                        num_epochs: int | None = None) -> grain.DatasetIterator:
    """Global batches of `batch_size` packed rows; samples reshuffled every epoch (seed), forever by default."""
    if not examples:
        raise ValueError("no training samples left (see the counts of dropped samples)")
    ds = grain.MapDataset.source(list(examples)).shuffle(seed=seed % 2**32).repeat(num_epochs)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    return iter(WholeSamplePackDataset(ds, seq_len).batch(batch_size, drop_remainder=True))


def make_eval_batches(examples: Sequence[Example], seq_len: int, batch_size: int,
                      max_batches: int | None = None) -> list[Batch]:
    """Held-out samples packed in order into global batches; the last one is filled with padding rows."""
    rows = list(iter_whole_sample_rows(examples, seq_len))
    if max_batches:
        rows = rows[: max_batches * batch_size]
    rows += [packing.empty_row(seq_len)] * (-len(rows) % batch_size)
    return [packing.stack_rows(rows[b: b + batch_size], seq_len) for b in range(0, len(rows), batch_size)]


def _count_rows(examples: Sequence[Example], seq_len: int, stats: SFTStats) -> None:
    for row in iter_whole_sample_rows(examples, seq_len):
        stats.train_rows += 1
        stats.tokens += int(np.sum(row["segment_ids"] > 0))
        stats.supervised_tokens += int(np.sum(row["loss_mask"] > 0))


# --------------------------------------------------------------------------------------------------------- top level


@dataclasses.dataclass
class SFTData:
    train_iter: grain.DatasetIterator  # global batches {name: [B, T]}, forever; get_state()/set_state()
    eval_batches: Callable[[], list[Batch]]  # the same held-out batches on every call
    stats: SFTStats

    def steps_for_epochs(self, num_epochs: float, batch_size: int) -> int:
        """Optimizer steps for about `num_epochs` passes: ceil(num_epochs x rows per epoch / batch_size)."""
        return max(1, math.ceil(num_epochs * self.stats.train_rows / batch_size))


def make_sft_data(samples: Sequence[Sample], tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  val_fraction: float = 0.05, overlong: str = "truncate", max_eval_batches: int | None = None,
                  stats: SFTStats | None = None) -> SFTData:
    """The SFT data from (dialog, train_on) samples (see `read_sft_samples`); counts go into `stats`.

    Args:
      samples: dialogs ending with an assistant message, each with its train_on ("all" | "last").
      tokenizer: Meta-semantics tokenizer (`encode(text, bos, eos)`, `bos_id`, `eos_id`).
      seq_len: T, tokens per packed row. batch_size: B, rows per global batch (train and eval).
      seed: shuffle seed. val_fraction: share of dialogs held out (0: no eval batches).
      overlong: "truncate" | "drop" (module docstring). max_eval_batches: cap on eval batches (None/0: all).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}, expected one of {', '.join(OVERLONG)}")
    if not samples:
        raise ValueError("no dialogs to train on")
    stats = stats or SFTStats()
    stats.seq_len, stats.dialogs = seq_len, len(samples)
    stats.special_tags = sum(chat.dialog_has_special_tags(dialog) for dialog, _ in samples)
    train, held_out = split_documents(samples, val_fraction)
    stats.train_dialogs, stats.eval_dialogs = len(train), len(held_out)
    train_examples = encode_samples(tokenizer, train, seq_len, overlong, stats)
    eval_examples = encode_samples(tokenizer, held_out, seq_len, overlong, stats)
    stats.train_samples, stats.eval_samples = len(train_examples), len(eval_examples)
    if not train_examples:
        raise ValueError(f"no training samples left of {stats.dialogs} dialogs ({stats.dropped_summary()}); raise "
                         "seq_len, or keep overlong samples with overlong='truncate'")
    _count_rows(train_examples, seq_len, stats)
    train_iter = make_train_iterator(train_examples, seq_len, batch_size, seed)
    cached = functools.cache(lambda: make_eval_batches(eval_examples, seq_len, batch_size, max_eval_batches))
    stats.eval_rows = len(list(iter_whole_sample_rows(eval_examples, seq_len)))
    _log_stats(stats)
    return SFTData(train_iter=train_iter, eval_batches=lambda: list(cached()), stats=stats)


def _log_stats(stats: SFTStats) -> None:
    _log.info("SFT data: %s", stats.summary())
    if stats.special_tags:  # Meta's chat_completion refuses such prompts; SFT would teach the tags as plain text
        _log.warning("SFT data: %d of %d dialogs contain [INST], [/INST], <<SYS>> or <</SYS>> inside a message; they "
                     "are trained on as plain text (clean the data if that is not intended)", stats.special_tags,
                     stats.dialogs)
    if stats.overlong or stats.dropped_unsupervised:
        _log.warning("SFT data: %d of %d samples longer than seq_len %d (%d truncated to whole turns, %d cut "
                     "mid-turn, %d dropped); %d without supervised tokens dropped", stats.overlong,
                     stats.train_dialogs + stats.eval_dialogs, stats.seq_len, stats.truncated_to_turns,
                     stats.truncated_mid_turn, stats.dropped_overlong, stats.dropped_unsupervised)


def load_sft_data(path, tokenizer, *, format: str = "auto", on_error: str = "raise", **kwargs) -> SFTData:
    """`read_sft_samples` + `make_sft_data` (kwargs as there); the reader's counts are in the stats too."""
    samples, read_stats = read_sft_samples(path, format, on_error)
    stats = SFTStats(path=str(path), format=read_stats.format, records=read_stats.records,
                     skipped=read_stats.skipped, reader_dropped=read_stats.dropped)
    return make_sft_data(samples, tokenizer, stats=stats, **kwargs)
