"""Argument checks shared by the transforms: fail at construction, naming the argument."""

from __future__ import annotations

import math


def check_learning_rate(learning_rate) -> None:
    """A learning rate is a finite float >= 0, or a schedule (any callable)."""
    if callable(learning_rate):
        return
    try:
        value = float(learning_rate)
    except TypeError:
        # An array of learning rates (e.g. under vmap) is checked by the caller's data.
        return
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(
            f"learning_rate must be a finite number >= 0 or a schedule, got {learning_rate!r}"
        )


def check_unit_interval(name: str, **values: float) -> None:
    """Each of `values` (b1, b2, decay...) must lie in [0, 1)."""
    for key, value in values.items():
        if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
            raise ValueError(f"{name}: {key} must be in [0, 1), got {value!r}")
