"""The learning-rate range test (Smith, 2017; fastai's `lr_find`).

Train for a short run while the learning rate grows exponentially from `min_lr` to
`max_lr`; record the loss at each rate; stop once the loss diverges (exceeds
`diverge_factor` x its best). The suggestion is the rate where the smoothed loss falls
fastest (steepest negative slope in log-rate), a common and robust choice.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from ..errors import JaxtrainError
from ..train import Progress
from ..train.logs import pyplot, save_figure
from .runs import RunSpec, batch_indices, initial_state, make_runner


@dataclasses.dataclass
class LRFindResult:
    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float

    def plot(self, path: str | Path) -> Path:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(self.learning_rates, self.losses, alpha=0.35, label="loss")
        ax.plot(self.learning_rates, self.smoothed, label="smoothed")
        ax.axvline(self.suggestion, color="C3", ls="--", label=f"suggested {self.suggestion:.3g}")
        ax.set_xscale("log")
        # the diverging tail (up to 4x the best loss) would flatten the rest: stop the
        # axis at 1.5x the starting loss
        low = np.nanmin(np.where(np.isfinite(self.losses), self.losses, np.nan))
        ax.set_ylim(low - 0.05 * abs(low), 1.5 * self.smoothed[0])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        return save_figure(fig, path, dpi=120)


def smooth(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (as fastai smooths the range test)."""
    out, avg = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def suggest(learning_rates: np.ndarray, smoothed: np.ndarray) -> float:
    """The rate of steepest descent of the smoothed loss against log learning rate."""
    if len(smoothed) < 3:
        raise JaxtrainError("the range test stopped before 3 steps: lower min_lr")
    slope = np.gradient(smoothed, np.log(learning_rates))
    return float(learning_rates[int(np.argmin(slope))])


def lr_find(spec: RunSpec, train: dict, steps: int = 100, min_lr: float = 1e-6,
            max_lr: float = 1.0, diverge_factor: float = 4.0, seed: int = 0,
            progress: bool = True) -> LRFindResult:
    """Run the range test with the optimizer of `spec` (its `learning_rate` is driven)."""
    if not (0 < min_lr < max_lr and math.isfinite(max_lr)):
        raise JaxtrainError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if steps < 3:
        raise JaxtrainError(f"steps must be >= 3, got {steps}")
    rates = np.geomspace(min_lr, max_lr, steps)
    start, chunk, _ = make_runner(spec)
    step = jax.jit(chunk, donate_argnums=(0,))  # one step per call: each loss decides
    set_rate = jax.jit(lambda s, lr: start(s, {"learning_rate": lr}))
    n = len(next(iter(train.values())))
    indices = batch_indices(n, spec.batch_size, seed, steps)
    state = initial_state(spec, seed)
    bar = Progress(steps, "lr-find", enabled=progress)
    losses, best = [], math.inf
    for i, lr in enumerate(rates):
        state = set_rate(state, np.float32(lr))
        state, loss = step(state, indices[i:i + 1], train)
        loss = float(loss[0])  # the test needs each loss to decide whether to stop
        losses.append(loss)
        bar.update(i + 1, {"lr": float(lr), "loss": loss})
        best = min(best, loss)
        if not math.isfinite(loss) or loss > diverge_factor * best:
            break
    bar.close()
    losses = np.array(losses)
    rates = rates[: len(losses)]
    smoothed = smooth(np.where(np.isfinite(losses), losses, np.nanmax(losses[np.isfinite(losses)])))
    return LRFindResult(rates, losses, smoothed, suggest(rates, smoothed))
