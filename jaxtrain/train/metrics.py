"""Held-out metrics beyond accuracy: precision, recall, F1 and the confusion matrix of a
classifier, perplexity of a language model.

A metric set is a `metric_fn(model, batch) -> per-example values` (what `make_eval_step`
sums under the batch's mask, so it stays jit-compiled and sharded like any other) that
may carry a `summarize(sums, count) -> dict` method: it turns the sums over the whole
held-out set into the reported values. Per-example values may have trailing dimensions:
the classifier's set gives each example's one-hot confusion entry (shape
`(num_classes, num_classes)`), so the summed confusion matrix comes out of the same
masked sum, and precision, recall and F1 follow from it exactly (as scikit-learn's
`precision_recall_fscore_support` computes them). `summarize_eval` applies it: scalar
results are the metrics logged and monitored; array results (per class, the confusion
matrix) are kept beside them and drawn as a PNG (`plot_confusion`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .logs import pyplot, save_figure


class MetricSet:
    """A `metric_fn` with a `summarize(sums, count) -> dict` step (see the module doc)."""

    def __init__(self, per_example, summarize, name: str):
        self.per_example, self.summarize, self.__name__ = per_example, summarize, name

    def __call__(self, model, batch) -> dict:
        return self.per_example(model, batch)

    def __repr__(self) -> str:
        return f"MetricSet({self.__name__})"


def mean_summary(sums: dict, count) -> dict:
    """Each summed value divided by the number of examples (the plain metric_fn's mean)."""
    return {k: v / count for k, v in sums.items()}


def summarize_eval(metric_fn, sums: dict) -> tuple[dict, dict]:
    """`(scalars, arrays)` from the eval step's sums over a held-out set (`count` is the
    number of examples): the metric set's `summarize` or the mean of each value; scalars
    as Python floats, anything with dimensions as a numpy array."""
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    count = sums.pop("count")
    summarize = getattr(metric_fn, "summarize", mean_summary)
    scalars, arrays = {}, {}
    for key, value in summarize(sums, count).items():
        value = np.asarray(value)
        if value.ndim == 0:
            scalars[key] = float(value)
        else:
            arrays[key] = value
    return scalars, arrays


# -- classification ------------------------------------------------------------------------


def confusion_entries(labels, predictions, num_classes: int) -> jax.Array:
    """Per-example one-hot confusion entries, `(batch, num_classes, num_classes)`: row the
    true class, column the predicted one (scikit-learn's `confusion_matrix` layout), so
    their (masked) sum is the confusion matrix."""
    truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    guess = jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)
    return truth[:, :, None] * guess[:, None, :]


def _per_example_classification(model, batch) -> dict:
    logits = model(batch["image"])
    labels = batch["label"]
    predictions = jnp.argmax(logits, -1)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        "accuracy": (predictions == labels).astype(jnp.float32),
        "confusion": confusion_entries(labels, predictions, logits.shape[-1]),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's `zero_division=0`)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def precision_recall_f1(confusion: np.ndarray) -> dict:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows true,
    columns predicted), and their macro averages over the classes that occur among the
    labels or the predictions (scikit-learn's default `labels`), 0 where undefined."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    present = (support + predicted) > 0
    macro = lambda x: float(x[present].mean()) if present.any() else 0.0
    return {"precision_macro": macro(precision), "recall_macro": macro(recall),
            "f1_macro": macro(f1), "precision_per_class": precision,
            "recall_per_class": recall, "f1_per_class": f1, "support": support}


def _summarize_classification(sums: dict, count) -> dict:
    confusion = sums.pop("confusion")
    return {**mean_summary(sums, count), **precision_recall_f1(confusion),
            "confusion": np.rint(confusion).astype(np.int64)}


classification_report = MetricSet(_per_example_classification, _summarize_classification,
                                  "classification_report")
"""Loss and accuracy (means), precision/recall/F1 (macro as scalars, per class as arrays)
and the confusion matrix of a classifier (`batch['image']` -> logits, `batch['label']`).
The per-example confusion entries take `num_classes**2` floats each: fine for tens or
hundreds of classes, not for a vocabulary."""


# -- language models -----------------------------------------------------------------------


def perplexity_summary(sums: dict, count) -> dict:
    """The means plus `perplexity = exp(mean next-token loss in nats)`."""
    means = mean_summary(sums, count)
    return {**means, "perplexity": np.exp(means["loss"])}


# -- pictures ------------------------------------------------------------------------------


def plot_confusion(confusion: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG: counts in each cell, rows true, columns predicted."""
    plt = pyplot()

    confusion = np.asarray(confusion)
    k = confusion.shape[0]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * k, 1.2 + 0.45 * k))
    ax.imshow(confusion, cmap="Blues")
    if k <= 30:
        top = confusion.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if confusion[i, j] > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    if title:
        ax.set_title(title)
    return save_figure(fig, path, dpi=120)
