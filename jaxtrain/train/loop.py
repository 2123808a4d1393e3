"""The training loop: dispatch compiled steps, fetch metrics only every `log_every` steps."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from ..data import eval_batches
from ..sharding import InFlight, batch_parallelism, shard_batch
from .progress import Progress


def fit(state, step_fn, batch_fn: Callable[[int], dict], steps: int, mesh, *,
        log_every: int = 10, logger=None, run: str = "train", progress: bool = True):
    """Run `steps` steps of the compiled `step_fn` from the state's own step.

    `batch_fn(step)` gives the host batch of a global step. Metrics stay on the device
    until every `log_every`-th step, so the host never waits on the hot path.
    Returns the final state and the logged `(step, metrics)` history.
    """
    start = int(state.step)
    bar = Progress(steps, run, enabled=progress)
    history, pending, in_flight = [], [], InFlight(mesh)
    for step in range(start, start + steps):
        state, metrics = step_fn(state, shard_batch(batch_fn(step), mesh))
        in_flight.add(metrics)
        pending.append((step + 1, metrics))
        if (step + 1 - start) % log_every == 0 or step + 1 == start + steps:
            for done, values in jax.device_get(pending):
                values = {k: float(v) for k, v in values.items()}
                history.append((done, values))
                if logger is not None:
                    logger.log(run, done, values)
            bar.update(done - start, history[-1][1])
            pending = []
    bar.close()
    return state, history


def evaluate(eval_fn, state, data: dict, mesh, batch_size: int = 256) -> dict:
    """Mean of each metric of the compiled `eval_fn` over the whole of `data`."""
    totals: dict = {}
    for batch in eval_batches(data, batch_size, multiple_of=batch_parallelism(mesh)):
        sums = eval_fn(state, shard_batch(batch, mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + np.float64(v)
    count = totals.pop("count")
    return {k: float(v / count) for k, v in totals.items()}
