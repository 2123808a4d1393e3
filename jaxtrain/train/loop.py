"""The training loop: dispatch compiled steps, fetch metrics only every `log_every` steps."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from ..data import eval_batches
from ..errors import JaxtrainError
from ..sharding import InFlight, batch_parallelism, shard_batch
from .metrics import summarize_eval
from .progress import Progress


def fit(state, step_fn, batch_fn: Callable[[int], dict], steps: int, mesh, *,
        log_every: int = 10, logger=None, run: str = "train", progress: bool = True):
    """Run the compiled `step_fn` until the state's step reaches `steps`.

    `steps` is a total, as in `Trainer.fit`: a state already at step 300 with `steps=500`
    takes 200 more steps, so a resumed run ends where an uninterrupted one would (a state
    at or past `steps` takes none). `batch_fn(step)` gives the host batch of a global step.
    Metrics stay on the device until every `log_every`-th step, so the host never waits on
    the hot path. Returns the final state and the logged `(step, metrics)` history.
    """
    if not isinstance(steps, int) or steps < 1:
        raise JaxtrainError(f"steps must be a positive integer, got {steps!r}")
    start = int(state.step)
    bar = Progress(max(steps - start, 0), run, enabled=progress)
    history, pending, in_flight = [], [], InFlight(mesh)
    for step in range(start, steps):
        state, metrics = step_fn(state, shard_batch(batch_fn(step), mesh))
        in_flight.add(metrics)
        pending.append((step + 1, metrics))
        if (step + 1 - start) % log_every == 0 or step + 1 == steps:
            for done, values in jax.device_get(pending):
                values = {k: float(v) for k, v in values.items()}
                history.append((done, values))
                if logger is not None:
                    logger.log(run, done, values)
            bar.update(done - start, history[-1][1])
            pending = []
    bar.close()
    return state, history


def evaluate(eval_fn, state, data: dict, mesh, batch_size: int = 256, metric_fn=None) -> dict:
    """Each metric of the compiled `eval_fn` over the whole of `data`: its mean, or what the
    metric set `metric_fn` (e.g. `classification_report`) makes of the sums: scalars as
    floats, per-class values and the confusion matrix as numpy arrays."""
    totals: dict = {}
    for batch in eval_batches(data, batch_size, multiple_of=batch_parallelism(mesh)):
        sums = eval_fn(state, shard_batch(batch, mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    scalars, arrays = summarize_eval(metric_fn, totals)
    return {**scalars, **arrays}
