"""Batches across processes: every process reads the same global batches and keeps its own contiguous rows; host
arrays to and from global arrays."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.model import sharding as sh


class ProcessRows:
    """Wraps an iterator of *global* batches and yields this process's contiguous block of rows.

    Every process reads the same global stream, so a run on P processes sees exactly the batches of a run on one
    process (the multi-host test relies on it). Reading everything on every host is cheap for tokenized text; for
    web-scale TFDS sources shard the source per host instead.
    """

    def __init__(self, iterator: Iterator[dict], index: int, count: int):
        self.iterator, self.index, self.count = iterator, index, count

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.rows(next(self.iterator))

    def rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * rows:(self.index + 1) * rows] for k, v in batch.items()}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


def process_local(train_iter, eval_batches: Optional[Callable[[], list]] = None):
    """(this process's rows of every global train batch, a function returning this process's rows of every global
    eval batch, or None without eval batches)."""
    local = ProcessRows(train_iter, jax.process_index(), jax.process_count())
    if eval_batches is None:
        return local, None
    return local, lambda: [local.rows(batch) for batch in eval_batches()]


def host_to_global(array, mesh) -> jax.Array:
    """The same host array on every process -> a global array split over the mesh's data axes (for this process's
    rows of a global batch use `loop.process_rows_to_global`)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sh.batch_sharding(mesh, array.ndim), lambda index: array[index])


def to_host(tree):
    """Global arrays -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
