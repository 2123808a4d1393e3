"""Batches as a pure function of (seed, step): shuffled per epoch, resumable by position.

The batch for global step `s` is the same whatever happened before, so saving the step
with the state is enough to resume a run exactly. With several hosts, each takes its own
contiguous slice of every global batch (`process_index` of `process_count`), so together
they see each example of an epoch exactly once. `Pipeline` adds prefetching in a
background thread and a position that can be saved and restored.

(Grain would offer the same pieces; with the batch a pure function of the step, the step
already is the whole iterator state, so a second source of truth is not needed.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import JaxtrainError


def _size(data: dict) -> int:
    sizes = {k: len(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise JaxtrainError(f"data arrays differ in length: {sizes}")
    return next(iter(sizes.values()))


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch (cached and read-only: `batch_at` asks
    for it every step)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def host_slice(batch: dict, process_index: int, process_count: int) -> dict:
    """This host's contiguous share of a global batch (leading dimension split evenly)."""
    if not 0 <= process_index < process_count:
        raise JaxtrainError(
            f"process_index {process_index} is outside 0..{process_count - 1} "
            f"(process_count={process_count})"
        )
    size = len(next(iter(batch.values())))
    if size % process_count:
        raise JaxtrainError(
            f"global batch of {size} cannot be split evenly over {process_count} processes"
        )
    per = size // process_count
    return {k: v[process_index * per : (process_index + 1) * per] for k, v in batch.items()}


def batch_at(data: dict, batch_size: int, seed: int, step: int, process_index: int = 0,
             process_count: int = 1) -> dict:
    """This host's part of the global batch of step `step` (`batch_size` is global):
    epochs of `n // batch_size` full batches, reshuffled each epoch."""
    n = _size(data)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise JaxtrainError(f"batch_size {batch_size} exceeds the {n} examples in the data")
    epoch, index = divmod(step, per_epoch)
    idx = epoch_order(n, seed, epoch)[index * batch_size : (index + 1) * batch_size]
    if process_count > 1 or process_index:
        idx = host_slice({"i": idx}, process_index, process_count)["i"]
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


class Pipeline:
    """Host batches of a run from `position` on, computed `prefetch` steps ahead in a
    background thread. `next(pipe)` advances; `pipe(step)` gives any step (so it can be
    a train loop's `batch_fn`); `state()` / `restore(state)` save and resume the position.
    Hosts default to `jax.process_index()` of `jax.process_count()`."""

    def __init__(self, data: dict, batch_size: int, seed: int = 0, position: int = 0,
                 prefetch: int = 2, process_index: int | None = None,
                 process_count: int | None = None):
        import jax

        _size(data)
        if not isinstance(prefetch, int) or prefetch < 0:
            raise JaxtrainError(f"prefetch must be a non-negative integer, got {prefetch!r}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.position, self.prefetch = position, prefetch
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._ahead: dict = {}
        batch_at(data, batch_size, seed, 0, self.process_index, self.process_count)  # validate

    def _compute(self, step: int) -> dict:
        return batch_at(self.data, self.batch_size, self.seed, step, self.process_index,
                        self.process_count)

    def __call__(self, step: int) -> dict:
        future = self._ahead.pop(step, None)
        batch = future.result() if future is not None else self._compute(step)
        if self._pool is not None:
            self._ahead = {s: f for s, f in self._ahead.items() if step < s <= step + self.prefetch}
            for s in range(step + 1, step + 1 + self.prefetch):
                if s not in self._ahead:
                    self._ahead[s] = self._pool.submit(self._compute, s)
        return batch

    def __iter__(self) -> Pipeline:
        return self

    def __next__(self) -> dict:
        batch = self(self.position)
        self.position += 1
        return batch

    def state(self) -> dict:
        """What resuming needs: the next position, and the seed and batch size that make
        positions meaningful."""
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`; the seed and batch size must be those of this run."""
        for key in ("seed", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise JaxtrainError(
                    f"pipeline state {key}={state.get(key)!r} does not match this pipeline's "
                    f"{key}={getattr(self, key)!r}"
                )
        self.position = int(state["position"])
        self._ahead.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
