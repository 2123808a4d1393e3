"""Batches as a pure function of (seed, step): shuffled per epoch, resumable by position.

The batch for global step `s` is the same whatever happened before, so saving the step
with the state is enough to resume a run exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import JaxtrainError


def _size(data: dict) -> int:
    sizes = {k: len(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise JaxtrainError(f"data arrays differ in length: {sizes}")
    return next(iter(sizes.values()))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(data: dict, batch_size: int, seed: int, step: int) -> dict:
    """The batch of global step `step`: epochs of `n // batch_size` full batches."""
    n = _size(data)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise JaxtrainError(f"batch_size {batch_size} exceeds the {n} examples in the data")
    epoch, index = divmod(step, per_epoch)
    idx = epoch_order(n, seed, epoch)[index * batch_size : (index + 1) * batch_size]
    return {k: v[idx] for k, v in data.items()}


def batches(data: dict, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """Endless batches from step `start` on (see `batch_at`)."""
    step = start
    while True:
        yield batch_at(data, batch_size, seed, step)
        step += 1


def eval_batches(data: dict, batch_size: int, multiple_of: int = 1) -> Iterator[dict]:
    """The whole data set once, in order, with a `mask` (1 for real examples, 0 for the
    padding that makes the last batch full and divisible by `multiple_of`)."""
    n = _size(data)
    batch_size = -(-batch_size // multiple_of) * multiple_of
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in data.items()}
        real = len(next(iter(chunk.values())))
        pad = batch_size - real
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
        chunk["mask"] = np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])
        yield chunk
