"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

`digits_split(classes)` keeps a subset of the classes, relabels them 0..k-1 in the given
order and splits them into train and held-out parts, deterministically by seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import JaxtrainError


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits: images (N, 8, 8) float32 in [0, 1], labels (N,) int32."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int32)


def digits_split(
    classes: Sequence[int] = tuple(range(10)), test_fraction: float = 0.25, seed: int = 0
) -> tuple[dict, dict]:
    """`(train, test)` dicts of `image` and `label` for `classes`, labels remapped to 0..k-1."""
    bad = [c for c in classes if c not in range(10)]
    if bad or len(set(classes)) < 2 or len(set(classes)) != len(classes):
        raise JaxtrainError(f"digit classes must be a subset of 0-9 of two or more distinct "
                            f"digits (one class leaves nothing to tell apart), got "
                            f"{list(classes)}")
    if not 0.0 < test_fraction < 1.0:
        raise JaxtrainError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = load_digits()
    keep = np.isin(labels, classes)
    images, labels = images[keep], labels[keep]
    remap = np.zeros(10, np.int32)
    remap[list(classes)] = np.arange(len(classes))
    labels = remap[labels]
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (
        {"image": images[train], "label": labels[train]},
        {"image": images[test], "label": labels[test]},
    )
