"""Argument checks shared by the transforms: fail at construction or init, naming the argument."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax

from ..errors import JaxtrainError


def _concrete(value):
    """`value` as a numpy array, or None when it is traced (inside jit / vmap)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def check_learning_rate(learning_rate, name: str = "learning_rate") -> None:
    """A learning rate is finite and >= 0 (a float, or an array of them under vmap), or a
    schedule (any callable). Traced values cannot be inspected and are let through."""
    if callable(learning_rate):
        return
    value = _concrete(learning_rate)
    if value is None:
        return
    if not (np.all(np.isfinite(value)) and np.all(value >= 0.0)):
        raise JaxtrainError(
            f"{name} must be a finite number >= 0 or a schedule, got {learning_rate!r}"
        )


def check_unit_interval(name: str, closed: bool = False, **values) -> None:
    """Each of `values` (b1, b2, decay, rho...) must lie in [0, 1) ([0, 1] if `closed`).
    Traced values cannot be inspected and are let through."""
    for key, value in values.items():
        arr = _concrete(value)
        if arr is None:
            continue
        x = float(arr) if arr.shape == () else math.nan
        if not (0.0 <= x <= 1.0 if closed else 0.0 <= x < 1.0):
            raise JaxtrainError(f"{name}: {key} must be a number in [0, 1{']' if closed else ')'}"
                                f", got {value!r}")


def check_nonnegative(name: str, **values) -> None:
    """Each of `values` (eps, weight_decay, momentum...) must be a finite number >= 0."""
    for key, value in values.items():
        if value is None or callable(value):
            continue
        arr = _concrete(value)
        if arr is None:
            continue
        if arr.shape != () or not (math.isfinite(float(arr)) and float(arr) >= 0.0):
            raise JaxtrainError(f"{name}: {key} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, **values) -> None:
    """Each of `values` must be a finite number > 0."""
    for key, value in values.items():
        check_nonnegative(name, **{key: value})
        arr = _concrete(value)
        if arr is not None and float(arr) == 0.0:
            raise JaxtrainError(f"{name}: {key} must be > 0, got {value!r}")


def check_mask(mask, params, name: str = "mask") -> None:
    """A mask (tree of bools, or `params -> tree of bools`) must have the params' structure
    or a prefix of it."""
    if mask is None:
        return
    tree = mask(params) if callable(mask) else mask
    try:
        jax.tree.map(lambda m, p: None, tree, params)
    except (ValueError, TypeError) as err:
        from .paths import path_list

        raise JaxtrainError(
            f"{name} does not match the params: its structure must equal the params' (or a "
            f"prefix of it); mask leaves {path_list(tree)[:8]}, params leaves "
            f"{path_list(params)[:8]} ({err.__class__.__name__})"
        ) from None


def with_mask_check(tx, mask, name: str = "mask"):
    """`tx` whose `init` first checks `mask` against the params."""
    if mask is None:
        return tx

    def init(params):
        check_mask(mask, params, name)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)
