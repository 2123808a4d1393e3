"""Metric-driven learning rate: scale the updates down when a monitored value plateaus.

`reduce_on_plateau` takes the decisions of torch's `ReduceLROnPlateau` (mode 'min' or 'max'), step
for step. It differs from `optax.contrib.reduce_on_plateau`, which reduces after
`patience` bad values where torch waits for `patience + 1`, and which can average the
value over several steps (`accumulation_size`) before deciding.

With `monitor` set (the name of a held-out metric, e.g. `accuracy`), the value comes not
from each update but from `observe_plateau(opt_state, value)`, which a training loop
calls after each evaluation (`jaxtrain.train.callbacks.PlateauOnEval`): the next update
decides on it, once, as torch's `scheduler.step(val_metric)` after an epoch does; the
updates in between keep the scale in force. The observed value waits in the state, so a
checkpoint taken between the evaluation and the next step resumes the same decision.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError


class PlateauState(NamedTuple):
    scale: jax.Array  # the factor in force on the updates (torch: lr / initial lr)
    best: jax.Array  # best value seen (torch: `best`)
    bad_steps: jax.Array  # values since the last improvement (torch: `num_bad_epochs`)
    cooldown: jax.Array  # steps of cooldown left (torch: `cooldown_counter`)


class ObservedPlateauState(NamedTuple):
    """The state of a `reduce_on_plateau` fed by `observe_plateau` (`monitor` set)."""
    plateau: PlateauState
    observed: jax.Array  # the value to decide on at the next update; NaN: none waiting


def reduce_on_plateau(factor: float = 0.1, patience: int = 10, rtol: float = 1e-4,
                      atol: float = 0.0, cooldown: int = 0,
                      min_scale: float = 0.0, monitor: str | None = None,
                      mode: str = "min") -> optax.GradientTransformationExtraArgs:
    """Scale the updates by `factor` each time the value passed as `update(..., value=m)`
    (or observed, see `monitor`) has not improved for more than `patience` steps.

    A value improves on the best when `m < best * (1 - rtol) - atol`: torch's
    `threshold_mode='rel'` with `rtol=threshold, atol=0`, its `'abs'` with `rtol=0,
    atol=threshold`. After a reduction, `cooldown` steps ignore bad values. The scale
    never falls below `min_scale` (torch `min_lr / lr`; torch's `eps`, a minimum change
    of the learning rate, has no counterpart). The update that receives m is scaled by
    the factor in force after m is taken into account, the same lr torch's optimizer
    uses on the step after `scheduler.step(m)`. Put it after the optimizer in a chain.

    `monitor`: decide on the values given to `observe_plateau` (named so for the loop
    that feeds them, see the module docstring) instead of each update's `value`;
    `mode='max'` for a value that should grow (accuracy): it improves when
    `m > best * (1 + rtol) + atol` (torch's mode='max').
    """
    if not 0.0 < factor < 1.0:
        raise JaxtrainError(f"reduce_on_plateau: factor must be in (0, 1), got {factor!r}")
    for name, value in (("patience", patience), ("cooldown", cooldown)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise JaxtrainError(f"reduce_on_plateau: {name} must be an integer >= 0, "
                                f"got {value!r}")
    for name, value in (("rtol", rtol), ("atol", atol), ("min_scale", min_scale)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise JaxtrainError(f"reduce_on_plateau: {name} must be a finite number >= 0, "
                                f"got {value!r}")

    if mode not in ("min", "max"):
        raise JaxtrainError(f"reduce_on_plateau: mode must be 'min' or 'max', got {mode!r}")
    if monitor is not None and not (isinstance(monitor, str) and monitor):
        raise JaxtrainError(f"reduce_on_plateau: monitor must be a metric name or null, "
                            f"got {monitor!r}")

    def fresh(params):
        del params
        return PlateauState(scale=jnp.ones((), jnp.float32),
                            best=jnp.full((), jnp.inf if mode == "min" else -jnp.inf,
                                          jnp.float32),
                            bad_steps=jnp.zeros((), jnp.int32),
                            cooldown=jnp.zeros((), jnp.int32))

    def decide(state: PlateauState, value) -> PlateauState:
        """torch's rule on one value."""
        value = jnp.asarray(value, jnp.float32)
        if mode == "min":
            improved = value < state.best * (1.0 - rtol) - atol
        else:
            improved = value > state.best * (1.0 + rtol) + atol
        best = jnp.where(improved, value, state.best)
        bad = jnp.where(improved, 0, state.bad_steps + 1)
        in_cooldown = state.cooldown > 0
        cool = jnp.where(in_cooldown, state.cooldown - 1, state.cooldown)
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > patience
        scale = jnp.where(reduce, jnp.maximum(state.scale * factor, min_scale), state.scale)
        return PlateauState(scale=scale, best=best, bad_steps=jnp.where(reduce, 0, bad),
                            cooldown=jnp.where(reduce, cooldown, cool))

    def scaled(updates, scale):
        return jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)

    def update(updates, state, params=None, *, value=None, **extra):
        del params, extra
        if value is None:
            raise JaxtrainError("reduce_on_plateau needs the monitored value: call "
                                "update(updates, state, params, value=metric)")
        state = decide(state, value)
        return scaled(updates, state.scale), state

    def init_observed(params):
        return ObservedPlateauState(fresh(params), jnp.full((), jnp.nan, jnp.float32))

    def update_observed(updates, state, params=None, **extra):
        del params, extra  # the step's own loss is not what this one monitors
        waiting = ~jnp.isnan(state.observed)
        plateau = jax.tree.map(lambda new, old: jnp.where(waiting, new, old),
                               decide(state.plateau, state.observed), state.plateau)
        return (scaled(updates, plateau.scale),
                ObservedPlateauState(plateau, jnp.full((), jnp.nan, jnp.float32)))

    if monitor is not None:
        return optax.GradientTransformationExtraArgs(init_observed, update_observed)
    return optax.GradientTransformationExtraArgs(fresh, update)


def observe_plateau(opt_state, value):
    """`opt_state` with `value` waiting in each `reduce_on_plateau(monitor=...)` state, to
    be decided on at the next update (placed as the value it replaces)."""
    def put(node):
        if not isinstance(node, ObservedPlateauState):
            return node
        new = jnp.asarray(value, jnp.float32)
        sharding = getattr(node.observed, "sharding", None)
        return node._replace(observed=new if sharding is None
                             else jax.device_put(new, sharding))

    return jax.tree.map(put, opt_state, is_leaf=lambda n: isinstance(n, ObservedPlateauState))
