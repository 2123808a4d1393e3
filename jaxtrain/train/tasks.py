"""Tasks: what a model is trained for, as a loss, held-out metrics and an end-of-run hook.

`loss_fn(model, batch, rng) -> (loss, aux)`; `metric_fn(model, batch) -> per-example
values` (a `jaxtrain.train.metrics.MetricSet` adds derived values: a classifier's
precision/recall/F1 and confusion matrix, a language model's perplexity);
`monitor`/`mode` name the held-out metric that "best" refers to;
`after_fit(model, data) -> str` (optional) gives text to show at the end (a sample).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..errors import JaxtrainError
from .language_model import lm_loss, lm_metrics, lm_sample
from .metrics import MetricSet, classification_report, perplexity_summary
from .regression import mse_loss, regression_report
from .step import classification_loss


@dataclasses.dataclass(frozen=True)
class Task:
    loss_fn: Callable
    metric_fn: Callable
    monitor: str = "loss"
    mode: str = "min"
    after_fit: Callable | None = None


TASKS = {
    "classification": Task(classification_loss, classification_report, "accuracy", "max"),
    "language_model": Task(lm_loss, MetricSet(lm_metrics, perplexity_summary, "lm_metrics"),
                           "loss", "min", after_fit=lm_sample),
    "regression": Task(mse_loss, regression_report, "loss", "min"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise JaxtrainError(f"unknown task {name!r} (valid: {', '.join(sorted(TASKS))})")
    return TASKS[name]
