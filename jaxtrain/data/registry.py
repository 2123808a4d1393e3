"""Data sets by name, for configs: `load('digits', classes=[0, 1])`.

Each loader returns `{'train': dict of arrays, 'valid': dict of arrays, 'info': dict}`;
`info` carries what a model needs to know (number of classes, vocabulary size, ...).
`records` reads data prepared on disk (`jaxtrain data prepare`): its `train` is a
`records.Records` split streamed with Grain, its `valid` columns are read on demand.
"""

from __future__ import annotations

import inspect

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


def load(name: str, key: str = "data", /, **kwargs) -> dict:
    """The named data set, loaded with `kwargs` (the config section `key` gives them). A
    keyword the data set does not take is refused in one line naming it and those it
    takes: an override `data.name=...` keeps the section's other keys (a `test_fraction`
    meant for the digits), so the line says how to replace the whole section."""
    if name not in DATASETS:
        raise JaxtrainError(f"unknown data set {name!r} (valid: {', '.join(sorted(DATASETS))})")
    accepted = inspect.signature(DATASETS[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        raise JaxtrainError(
            f"config key '{key}.{unknown[0]}': data set {name!r} takes no {unknown[0]!r} "
            f"(it takes {', '.join(accepted)}); an override of {key}.name keeps the "
            f"section's other keys: give the whole section instead, e.g. "
            f"{key}='{{name: {name}, ...}}'")
    try:
        return DATASETS[name](**kwargs)
    except TypeError as err:
        raise JaxtrainError(f"data set {name!r}: {err}") from None
