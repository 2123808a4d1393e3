"""Synthetic data with known answers, for tests and benchmarks.

Regression: y = x @ w + b + noise with a random linear teacher (the least-squares fit
recovers it). Classification: Gaussian clusters, one per class, keyed `image`/`label` so
the `classification` task takes them as they are.
"""

from __future__ import annotations

import numpy as np

from ..errors import JaxtrainError


def _check(n_train: int, n_valid: int, features: int) -> None:
    for name, value in (("n_train", n_train), ("n_valid", n_valid), ("features", features)):
        if not isinstance(value, int) or value < 1:
            raise JaxtrainError(f"{name} must be a positive integer, got {value!r}")


def synthetic_regression(n_train: int = 1024, n_valid: int = 256, features: int = 16,
                         targets: int = 1, noise: float = 0.1, seed: int = 0) -> dict:
    """`x` (n, features) standard normal, `y` (n, targets) from a random linear teacher;
    `info` holds the teacher (`weights`, `bias`)."""
    _check(n_train, n_valid, features)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, targets)) / np.sqrt(features)
    b = rng.normal(size=(targets,))
    x = rng.normal(size=(n_train + n_valid, features))
    y = x @ w + b + noise * rng.normal(size=(n_train + n_valid, targets))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return {
        "train": {"x": x[:n_train], "y": y[:n_train]},
        "valid": {"x": x[n_train:], "y": y[n_train:]},
        "info": {"features": features, "targets": targets, "noise": noise,
                 "weights": w.astype(np.float32), "bias": b.astype(np.float32)},
    }


def synthetic_classification(n_train: int = 1024, n_valid: int = 256, features: int = 16,
                             num_classes: int = 4, separation: float = 3.0,
                             seed: int = 0) -> dict:
    """`image` (n, features): unit-variance Gaussian clusters whose centres lie
    `separation` apart on average; `label` (n,) int32, classes balanced in expectation."""
    _check(n_train, n_valid, features)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise JaxtrainError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, features)) * separation / np.sqrt(2 * features)
    labels = rng.integers(0, num_classes, size=n_train + n_valid).astype(np.int32)
    x = (centres[labels] + rng.normal(size=(len(labels), features))).astype(np.float32)
    return {
        "train": {"image": x[:n_train], "label": labels[:n_train]},
        "valid": {"image": x[n_train:], "label": labels[n_train:]},
        "info": {"features": features, "num_classes": num_classes},
    }
