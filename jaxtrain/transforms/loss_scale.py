"""Dynamic loss scaling for float16 training, as a wrapper around any optimizer.

The step multiplies the loss by `loss_scale_value(opt_state)` before differentiating;
`dynamic_loss_scale(inner)` divides the gradients by the same scale and then:
- all finite: `inner` updates as usual; after `period` finite steps in a row the scale is
  multiplied by `factor`;
- any inf/nan (an overflow): the update is zero, `inner`'s state is kept as it was (the
  step is skipped) and the scale is divided by `factor` (not below `min_scale`).
This is the rule of Micikevicius et al. (2018) and of `torch.amp.GradScaler`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from .find import find_state


class LossScaleState(NamedTuple):
    scale: jax.Array  # float32
    good_steps: jax.Array  # finite steps since the scale last changed
    skipped: jax.Array  # overflow steps skipped so far
    inner_state: Any


def dynamic_loss_scale(inner: optax.GradientTransformation, initial_scale: float = 2.0**15,
                       period: int = 2000, factor: float = 2.0, min_scale: float = 1.0
                       ) -> optax.GradientTransformationExtraArgs:
    """Unscale the gradients, skip steps that overflowed and adapt the scale (see above)."""
    if not (isinstance(period, int) and period >= 1):
        raise JaxtrainError(f"dynamic_loss_scale: period must be an integer >= 1, got {period!r}")
    if not factor > 1.0:
        raise JaxtrainError(f"dynamic_loss_scale: factor must be > 1, got {factor!r}")
    if not 0.0 < min_scale <= initial_scale:
        raise JaxtrainError(f"dynamic_loss_scale: need 0 < min_scale <= initial_scale, got "
                            f"{min_scale!r}, {initial_scale!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return LossScaleState(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32),
                              jnp.zeros((), jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / state.scale, updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        new_updates, new_inner = inner.update(grads, state.inner_state, params, **extra)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                                   new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_inner,
                                 state.inner_state)
        scale, good = next_loss_scale(state.scale, state.good_steps, finite, period, factor,
                                      min_scale)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        return new_updates, LossScaleState(scale, good, skipped, new_inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def next_loss_scale(scale, good_steps, finite, period: int, factor: float = 2.0,
                    min_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The grow/shrink rule, `(scale, good_steps)` after a step whose gradients were all
    finite (`finite`) or not: the one rule of `dynamic_loss_scale` and of the train step's
    `LossScale` (jaxtrain.train.precision)."""
    grow = finite & (good_steps + 1 >= period)
    scale = jnp.where(finite, jnp.where(grow, scale * factor, scale),
                      jnp.maximum(scale / factor, min_scale))
    good = jnp.where(finite & ~grow, good_steps + 1, 0).astype(jnp.int32)
    return scale, good


def loss_scale_value(opt_state) -> jax.Array:
    """The scale in force: that of the first `LossScaleState` found in `opt_state`."""
    return loss_scale_state(opt_state).scale


def loss_scale_state(opt_state) -> LossScaleState:
    """The first `LossScaleState` in `opt_state` (its scale, good steps, skipped steps)."""
    return find_state(opt_state, LossScaleState,
                      "no dynamic_loss_scale in this optimizer state; wrap the optimizer in "
                      "jaxtrain.transforms.dynamic_loss_scale")
