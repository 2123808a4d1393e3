"""Argument checks shared by the transforms: fail at construction or init, naming the argument."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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


# Step counts at which `check_in_dtypes` reads a schedule, as Optax passes them (int32):
# every step of a short run, then log-spaced to the largest count.
_PROBE_STEPS = np.unique(np.concatenate([
    np.arange(1024), np.geomspace(1024, np.iinfo(np.int32).max, 128).astype(np.int64)]))


def _schedule_values(schedule):
    """`schedule` at `_PROBE_STEPS` (float64), read eagerly even inside a trace (about
    25 ms); None when it cannot be read that way."""
    try:
        with jax.ensure_compile_time_eval():
            values = jax.vmap(schedule)(jnp.asarray(_PROBE_STEPS, jnp.int32))
        return np.asarray(values, np.float64)
    except Exception:  # the step-time check (nan_policy) still sees what this cannot
        return None


def _narrowest_float(tree):
    """The floating dtype of `tree` with the smallest largest value, or None."""
    dtypes = {jnp.result_type(x) for x in jax.tree.leaves(tree)}
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return min(floats, key=lambda d: float(jnp.finfo(d).max), default=None)


def check_in_dtypes(name: str, hyperparams: dict, dtype, params) -> None:
    """Each numeric hyperparameter keeps its meaning once held in `dtype`: a finite one stays
    finite and a nonzero one nonzero (eps=1e-50 is 0 in float32); and `learning_rate`, a
    number or every value of a schedule, is finite in the params' narrowest floating dtype,
    where the updates land (1e39 is infinite in float32, 1e5 in float16). Checked when the
    params are first seen (`init`), so a run is refused before its first step; traced
    values cannot be read and are let through."""
    held_in = jnp.finfo(dtype)
    narrow = _narrowest_float(params)
    for key, value in hyperparams.items():
        schedule = callable(value)
        if isinstance(value, bool) or (schedule and key != "learning_rate"):
            continue
        arr = _schedule_values(value) if schedule else _concrete(value)
        if arr is None:
            continue
        arr = arr.reshape(-1)
        with np.errstate(over="ignore", under="ignore"):
            held = arr.astype(jnp.dtype(dtype)).astype(np.float64)
        faults = [(np.isfinite(arr) & ~np.isfinite(held),
                   f"is not finite in {held_in.dtype.name}, the dtype the optimizer holds "
                   f"it in (largest {float(held_in.max):.3g})"),
                  ((arr != 0) & (held == 0),
                   f"is 0 in {held_in.dtype.name}, the dtype the optimizer holds it in "
                   f"(smallest positive {float(held_in.smallest_subnormal):.3g})")]
        if key == "learning_rate" and narrow is not None:
            largest = float(jnp.finfo(narrow).max)
            faults[:0] = [(~np.isfinite(arr) | (np.abs(arr) > largest), f"is not finite in "
                           f"{jnp.dtype(narrow).name}, the params' dtype (largest "
                           f"{largest:.3g})"),
                          (arr < 0, "is negative (a learning rate below 0 trains by "
                                    "gradient ascent)")]
        for bad, why in faults:
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                shown = (f"the {key} schedule's value at step {int(_PROBE_STEPS[i])}, "
                         f"{arr[i]:.3g}," if schedule else f"{key}={value!r}")
                raise JaxtrainError(f"{name}: {shown} {why}")


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
