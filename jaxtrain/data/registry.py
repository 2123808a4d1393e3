"""Data sets by name, for configs: `load('digits', classes=[0, 1])`.

Each loader returns `{'train': dict of arrays, 'valid': dict of arrays, 'info': dict}`;
`info` carries what a model needs to know (number of classes, vocabulary size, ...).
`records` reads data prepared on disk (`jaxtrain data prepare`): its `train` is a
`records.Records` split streamed with Grain, its `valid` columns are read on demand.
"""

from __future__ import annotations

from ..errors import JaxtrainError
from .digits import digits_split
from .records import load_records
from .synthetic import synthetic_classification, synthetic_regression
from .text import load_text


def _digits(classes=tuple(range(10)), test_fraction: float = 0.25, seed: int = 0) -> dict:
    train, valid = digits_split(tuple(classes), test_fraction, seed)
    # flip: a mirrored digit is not the same digit (data.augment refuses flipping)
    return {"train": train, "valid": valid,
            "info": {"num_classes": len(classes), "flip": False}}


DATASETS = {
    "digits": _digits,
    "records": load_records,
    "text": load_text,
    "synthetic_regression": synthetic_regression,
    "synthetic_classification": synthetic_classification,
}


def load(name: str, **kwargs) -> dict:
    """The named data set, loaded with `kwargs`."""
    if name not in DATASETS:
        raise JaxtrainError(f"unknown data set {name!r} (valid: {', '.join(sorted(DATASETS))})")
    try:
        return DATASETS[name](**kwargs)
    except TypeError as err:
        raise JaxtrainError(f"data set {name!r}: {err}") from None
