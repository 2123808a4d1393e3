"""bfloat16 params and optimizer state without losing small updates.

Rounding `params + update` to bfloat16 (8 significant bits) to nearest drops every
update smaller than half a unit in the last place, so long runs stall. Two remedies:
- `stochastic_rounding(key)` (last in a chain): round `params + update` up or down with
  probabilities given by the distance to the two neighbours, so the rounding is unbiased
  (E[round(x)] = x) and small updates survive on average;
- `fp32_master(inner)`: keep a float32 copy of the params in the optimizer state, run
  `inner` on it, and give the bfloat16 params the master's nearest value.
`low_precision_state(inner, dtype)` stores `inner`'s float per-param state (Adam's
moments...) in `dtype`, computing in float32; scalars (injected hyperparameters) keep theirs.
Both return float32 updates such that `optax.apply_updates` lands exactly on the rounded
value (the difference of two bfloat16 numbers is exact in float32).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

F32 = jnp.float32


def stochastic_round_bf16(x: jax.Array, key) -> jax.Array:
    """float32 -> bfloat16, rounding up with probability (x - down) / (up - down)."""
    bits = jax.lax.bitcast_convert_type(x.astype(F32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)  # carry into the kept bits, truncate
    return jax.lax.bitcast_convert_type(rounded, F32).astype(jnp.bfloat16)


class StochasticRoundingState(NamedTuple):
    key: jax.Array


def stochastic_rounding(key) -> optax.GradientTransformation:
    """Last in a chain: bfloat16 params move to a stochastic rounding of params + update.

    float32 params are left to the usual update. `key`: a `jax.random.PRNGKey`.
    """

    def init_fn(params):
        del params
        return StochasticRoundingState(jnp.asarray(key))

    def update_fn(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        new_key, *keys = jax.random.split(state.key, len(leaves) + 1)
        keys = treedef.unflatten(keys)

        def one(u, p, k):
            if not (p.dtype == jnp.bfloat16):
                return u
            target = stochastic_round_bf16(p.astype(F32) + u.astype(F32), k)
            return target.astype(F32) - p.astype(F32)

        return jax.tree.map(one, updates, params, keys), StochasticRoundingState(new_key)

    return optax.GradientTransformation(init_fn, update_fn)


class MasterState(NamedTuple):
    master: Any  # float32 params
    inner_state: Any


def fp32_master(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Run `inner` on a float32 master copy; low-precision params follow it (to nearest)."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        master = jax.tree.map(lambda p: p.astype(F32), params)
        return MasterState(master, inner.init(master))

    def update_fn(updates, state, params=None, **extra):
        grads = jax.tree.map(lambda g: g.astype(F32), updates)
        steps, inner_state = inner.update(grads, state.inner_state, state.master, **extra)
        master = optax.apply_updates(state.master, steps)
        out = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(F32) - p.astype(F32),
                           master, params)
        return out, MasterState(master, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def low_precision_state(inner: optax.GradientTransformation, dtype=jnp.bfloat16
                        ) -> optax.GradientTransformationExtraArgs:
    """`inner` with its floating-point per-param state stored in `dtype` (computed in
    float32); scalar leaves (hyperparameters, counts) are left as they are."""
    inner = optax.with_extra_args_support(inner)

    def cast(tree, to):
        # per-param buffers only: a scalar is a hyperparameter or a scale (Adam's b2=0.999
        # is 1.0 in bfloat16, which makes its bias correction divide by zero)
        return jax.tree.map(
            lambda x: x.astype(to) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            and jnp.ndim(x) > 0 else x, tree)

    def init_fn(params):
        return cast(inner.init(params), dtype)

    def update_fn(updates, state, params=None, **extra):
        new_updates, new_state = inner.update(updates, cast(state, F32), params, **extra)
        return new_updates, cast(new_state, dtype)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
