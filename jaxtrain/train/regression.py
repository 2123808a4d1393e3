"""The regression task: mean squared error, with R^2 on held-out data.

Batches hold `x` (batch, features) and `y` (batch, targets), as `synthetic_regression`
gives them. The held-out summary reports `loss` (the mean squared error over examples and
targets), `rmse` and `r2`, the coefficient of determination averaged over the targets
(scikit-learn's `r2_score` with `multioutput='uniform_average'`):

    R^2_j = 1 - sum_i (y_ij - f_ij)^2 / sum_i (y_ij - mean_j)^2

computed from masked sums of `y`, `y^2` and the squared residual (so it stays one
compiled, sharded pass over the held-out set like every other metric).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .metrics import MetricSet


def _predict(model, batch):
    y = jnp.asarray(batch["y"], jnp.float32)
    pred = jnp.asarray(model(batch["x"]), jnp.float32).reshape(y.shape)
    return pred, y


def mse_loss(model, batch, rng):
    """Mean squared error over the batch and the targets."""
    del rng
    pred, y = _predict(model, batch)
    return jnp.mean(jnp.square(pred - y)), {}


def _per_example(model, batch) -> dict:
    pred, y = _predict(model, batch)
    y = y.reshape(y.shape[0], -1)
    residual = jnp.square(pred.reshape(y.shape) - y)
    return {"loss": residual.mean(-1), "sq_error": residual, "y": y, "y_sq": jnp.square(y)}


def _summarize(sums: dict, count) -> dict:
    """Mean squared error, its root and R^2 from the held-out sums (float64 on the host)."""
    total = sums["y_sq"] - np.square(sums["y"]) / count  # sum of (y - mean)^2 per target
    r2 = 1.0 - sums["sq_error"] / np.where(total > 0, total, np.nan)
    mse = sums["loss"] / count
    return {"loss": mse, "rmse": np.sqrt(mse), "r2": float(np.mean(r2))}


regression_report = MetricSet(_per_example, _summarize, "regression_report")
