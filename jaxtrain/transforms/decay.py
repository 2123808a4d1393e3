"""Weight decay rules, each restricted by an optional `mask` (see `masks.py`).

- `add_l2`: coupled L2, `g + wd * p` before the optimizer (torch SGD/Adam `weight_decay`).
- `add_decoupled_weight_decay`: after the optimizer, `u - lr * wd * p` (AdamW; Loshchilov
  & Hutter), with the optimizer's learning rate (a float or the same schedule).
- `add_l1`: `g + wd * sign(p)` before the optimizer (the gradient of `wd * |p|`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError


def _check(name: str, weight_decay) -> None:
    if not (isinstance(weight_decay, int | float) and not isinstance(weight_decay, bool)
            and math.isfinite(weight_decay) and weight_decay >= 0):
        raise JaxtrainError(f"{name}: weight_decay must be a finite number >= 0, "
                            f"got {weight_decay!r}")


def _masked(tx, mask):
    return tx if mask is None else optax.masked(tx, mask)


def _need_params(name, params):
    if params is None:
        raise JaxtrainError(f"{name} needs the params: call update(updates, state, params)")


def add_l2(weight_decay: float, mask=None) -> optax.GradientTransformation:
    """Add `weight_decay * p` to the gradient; put it before the optimizer."""
    _check("add_l2", weight_decay)
    return optax.add_decayed_weights(weight_decay, mask)


def add_l1(weight_decay: float, mask=None) -> optax.GradientTransformation:
    """Add `weight_decay * sign(p)` to the gradient; put it before the optimizer."""
    _check("add_l1", weight_decay)

    def update(updates, state, params=None):
        _need_params("add_l1", params)
        return jax.tree.map(lambda g, p: g + weight_decay * jnp.sign(p).astype(g.dtype),
                            updates, params), state

    return _masked(optax.GradientTransformation(lambda _: optax.EmptyState(), update), mask)


class DecoupledDecayState(NamedTuple):
    count: jax.Array  # steps taken: where a learning-rate schedule is evaluated


def add_decoupled_weight_decay(weight_decay: float, learning_rate=1.0,
                               mask=None) -> optax.GradientTransformation:
    """Subtract `learning_rate * weight_decay * p` from the updates; put it after the
    optimizer, with the optimizer's `learning_rate` (a float or the same schedule), so
    that `chain(adam(lr), add_decoupled_weight_decay(wd, lr))` is torch's AdamW."""
    _check("add_decoupled_weight_decay", weight_decay)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        del params
        return DecoupledDecayState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        _need_params("add_decoupled_weight_decay", params)
        step = jnp.asarray(schedule(state.count), jnp.float32) * weight_decay
        updates = jax.tree.map(lambda u, p: u - (step * p).astype(u.dtype), updates, params)
        return updates, DecoupledDecayState(count=optax.safe_increment(state.count))

    return _masked(optax.GradientTransformation(init, update), mask)
