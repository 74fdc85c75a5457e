"""Batches from the data pipelines' iterators: the next n, and two lists compared array by array."""

import numpy as np


def take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
