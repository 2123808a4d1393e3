"""Metric-driven learning rate: scale the updates down when a monitored value plateaus.

`reduce_on_plateau` takes the decisions of torch's `ReduceLROnPlateau(mode='min')`, step
for step. It differs from `optax.contrib.reduce_on_plateau`, which reduces after
`patience` bad values where torch waits for `patience + 1`, and which can average the
value over several steps (`accumulation_size`) before deciding.
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


def reduce_on_plateau(factor: float = 0.1, patience: int = 10, rtol: float = 1e-4,
                      atol: float = 0.0, cooldown: int = 0,
                      min_scale: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Scale the updates by `factor` each time the value passed as `update(..., value=m)`
    has not improved for more than `patience` steps.

    A value improves on the best when `m < best * (1 - rtol) - atol`: torch's
    `threshold_mode='rel'` with `rtol=threshold, atol=0`, its `'abs'` with `rtol=0,
    atol=threshold`. After a reduction, `cooldown` steps ignore bad values. The scale
    never falls below `min_scale` (torch `min_lr / lr`; torch's `eps`, a minimum change
    of the learning rate, has no counterpart). The update that receives m is scaled by
    the factor in force after m is taken into account, the same lr torch's optimizer
    uses on the step after `scheduler.step(m)`. Put it after the optimizer in a chain.
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

    def init(params):
        del params
        return PlateauState(scale=jnp.ones((), jnp.float32),
                            best=jnp.full((), jnp.inf, jnp.float32),
                            bad_steps=jnp.zeros((), jnp.int32),
                            cooldown=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, value=None, **extra):
        del params, extra
        if value is None:
            raise JaxtrainError("reduce_on_plateau needs the monitored value: call "
                                "update(updates, state, params, value=metric)")
        value = jnp.asarray(value, jnp.float32)
        improved = value < state.best * (1.0 - rtol) - atol
        best = jnp.where(improved, value, state.best)
        bad = jnp.where(improved, 0, state.bad_steps + 1)
        in_cooldown = state.cooldown > 0
        cool = jnp.where(in_cooldown, state.cooldown - 1, state.cooldown)
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > patience
        scale = jnp.where(reduce, jnp.maximum(state.scale * factor, min_scale), state.scale)
        new_state = PlateauState(scale=scale, best=best,
                                 bad_steps=jnp.where(reduce, 0, bad),
                                 cooldown=jnp.where(reduce, cooldown, cool))
        updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)
