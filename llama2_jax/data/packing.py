"""Packing tokenized documents into fixed-length rows, in the batch format the whole project uses.

One packed row (T = seq_len) is a dict of numpy arrays; a batch stacks rows to [B, T]:

  inputs       int32   [T]  token ids (0 at padding)
  targets      int32   [T]  next token of the same document: targets[t] = inputs[t+1]; 0 where there is none
  segment_ids  int32   [T]  1, 2, 3, ... for the document pieces of the row in order; 0 = padding
  positions    int32   [T]  position within its own piece, restarting at 0 for each piece
  loss_mask    float32 [T]  weight of the target at t: 0 for padding and for the last token of each piece

The model masks attention with `segment_ids`, so attention never crosses documents, and no target crosses documents.

Packing is greedy and keeps the input order: pieces are appended to the current row until the next one does not fit.
A document longer than the free space is split; its next piece starts the next row. Consecutive pieces overlap by one
token (the last input of a piece is the first input of the next), so every next-token target of a document is counted
exactly once; positions restart at 0 in each piece, which is simple and harmless for pretraining. No piece shorter than
2 tokens is started at the end of a row (it could not carry a target), so such a row ends with padding instead.

Per-token weights let SFT reuse this: an example is `(tokens, weights)` with `weights[i]` the loss weight of
*predicting* `tokens[i]` (e.g. 1 for answer tokens, 0 for prompt tokens; `weights[0]` is never used).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

Example = tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray]


class RowBuilder:
    """Fills one row of length `seq_len` with document pieces, then converts it to the batch format."""

    def __init__(self, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self._tokens = np.zeros(seq_len, np.int32)
        self._weights = np.zeros(seq_len, np.float32)
        self._segment_ids = np.zeros(seq_len, np.int32)
        self._positions = np.zeros(seq_len, np.int32)
        self._used = 0
        self._segments = 0

    @property
    def free(self) -> int:
        return self.seq_len - self._used

    @property
    def empty(self) -> bool:
        return self._used == 0

    def add(self, tokens: np.ndarray, weights: np.ndarray) -> None:
        """Appends one piece [n] (n <= free) as a new segment."""
        n = len(tokens)
        assert 0 < n <= self.free, (n, self.free)
        span = slice(self._used, self._used + n)
        self._segments += 1
        self._tokens[span] = tokens
        self._weights[span] = weights
        self._segment_ids[span] = self._segments
        self._positions[span] = np.arange(n, dtype=np.int32)
        self._used += n

    def finish(self) -> dict[str, np.ndarray]:
        """The row in the batch format (each array [T]); targets and loss_mask never cross a segment boundary."""
        seg = self._segment_ids
        same = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)  # [T-1]: position t has a next token in its own piece
        targets = np.zeros_like(self._tokens)
        targets[:-1] = np.where(same, self._tokens[1:], 0)
        loss_mask = np.zeros(self.seq_len, np.float32)
        loss_mask[:-1] = np.where(same, self._weights[1:], 0.0)
        return {
            "inputs": self._tokens.copy(),
            "targets": targets,
            "segment_ids": seg.copy(),
            "positions": self._positions.copy(),
            "loss_mask": loss_mask,
        }


def next_piece(length: int, offset: int, free: int) -> tuple[int, int] | None:
    """Where the next piece of a document ends, and where the one after it starts.

    Args:
      length: document length in tokens.
      offset: first token of the piece.
      free: free slots in the current row.

    Returns:
      (end, next_offset), or None when the row must be closed first. Pieces overlap by one token, so a piece that does
      not finish the document gives next_offset = end - 1; next_offset == length when the document is done.
    """
    remaining = length - offset
    if free < min(2, remaining):
        return None
    end = offset + min(free, remaining)
    return end, (end if end == length else end - 1)


def as_example(tokens, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Converts tokens [n] and optional weights [n] (default all 1) to int32 / float32 arrays."""
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if weights is None:
        return tokens, np.ones(len(tokens), np.float32)
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if len(weights) != len(tokens):
        raise ValueError(f"example has {len(tokens)} tokens but {len(weights)} loss weights; they must be equal")
    return tokens, weights


def iter_packed_rows(examples: Iterable[Example], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Greedily packs `(tokens, weights)` examples in order; yields rows (dicts of [T] arrays); skips empty examples."""
    row = RowBuilder(seq_len)
    for tokens, weights in examples:
        tokens, weights = as_example(tokens, weights)
        offset = 0
        while offset < len(tokens):
            piece = next_piece(len(tokens), offset, row.free)
            if piece is None:
                yield row.finish()
                row = RowBuilder(seq_len)
                continue
            end, next_offset = piece
            row.add(tokens[offset:end], weights[offset:end])
            offset = next_offset
    if not row.empty:
        yield row.finish()


def stack_rows(rows: Sequence[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch: each feature [N, T] (N may be 0)."""
    if not rows:
        return {k: np.zeros((0, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in FEATURES}
    return {k: np.stack([row[k] for row in rows]) for k in FEATURES}


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row of padding only (segment_ids 0, loss_mask 0), for filling the last batch to a fixed shape."""
    return RowBuilder(seq_len).finish()


def pack_examples(examples: Iterable[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Packs `(tokens, weights)` examples (weights [n]: loss weight of predicting tokens[i]) into arrays [N, T]."""
    return stack_rows(list(iter_packed_rows(examples, seq_len)), seq_len)


def pack_documents(token_lists: Iterable[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
    """Packs token lists (e.g. BOS + document + EOS), every target weighted 1, into arrays [N, T] (see module doc)."""
    return pack_examples(((tokens, None) for tokens in token_lists), seq_len)


def unigram_entropy(token_lists: Iterable[Sequence[int]]) -> float:
    """Entropy, in nats, of the token frequency distribution over all the given tokens.

    It is the cross-entropy loss of the best model that ignores context, so a trainer can print it next to the
    validation loss (also in nats) as the level a language model must get below.
    """
    arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if tokens.size == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = np.unique(tokens, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())
