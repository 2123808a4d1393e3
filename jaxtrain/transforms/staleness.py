"""Bounded gradient staleness, simulated exactly inside one program.

In asynchronous (parameter-server) training a worker's gradient reaches the server some
steps after the params it was computed on. `stale_gradients(tx, delay)` reproduces a
fixed delay deterministically: the update applied at step t is `tx`'s update of the
gradient computed at step t - delay (on the params of that step), so the effect of
staleness on a run can be studied without a cluster, under `jit`, `vmap` and sharding.
The last `delay` gradients wait in a ring buffer in the optimizer state (memory: `delay`
copies of the gradients); for the first `delay` steps no gradient has arrived yet, so
the update is zero and `tx`'s state is left as it was.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError


class StaleGradientsState(NamedTuple):
    slot: jax.Array  # where this step's gradient goes and the oldest one is (int32)
    full: jax.Array  # whether `delay` gradients have been received (bool)
    buffer: Any  # the last `delay` gradients, leading axis `delay`
    inner: Any  # the wrapped transform's state


def stale_gradients(inner: optax.GradientTransformation,
                    delay: int) -> optax.GradientTransformationExtraArgs:
    """`inner` applied to the gradient of `delay` steps ago (see the module doc); `delay=0`
    is `inner` itself. Extra args (`value=` for `reduce_on_plateau`) and the params reach
    `inner` as they are now."""
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise JaxtrainError(f"stale_gradients: delay must be an integer >= 0, got {delay!r}")
    if not isinstance(inner, optax.GradientTransformation):
        raise JaxtrainError(f"stale_gradients: expected an optax GradientTransformation to "
                            f"wrap, got {type(inner).__name__}")
    inner = optax.with_extra_args_support(inner)
    if delay == 0:
        return inner

    def init(params):
        buffer = jax.tree.map(lambda p: jnp.zeros((delay, *p.shape), p.dtype), params)
        return StaleGradientsState(jnp.zeros((), jnp.int32), jnp.zeros((), bool), buffer,
                                   inner.init(params))

    def update(updates, state, params=None, **extra):
        slot = state.slot
        arrived = jax.tree.map(lambda b: b[slot], state.buffer)
        buffer = jax.tree.map(lambda b, g: b.at[slot].set(g.astype(b.dtype)), state.buffer,
                              updates)

        def apply(_):
            return inner.update(arrived, state.inner, params, **extra)

        def wait(_):
            return jax.tree.map(jnp.zeros_like, arrived), state.inner

        new_updates, inner_state = jax.lax.cond(state.full, apply, wait, None)
        following = (slot + 1) % delay
        return new_updates, StaleGradientsState(following, state.full | (following == 0),
                                                buffer, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
