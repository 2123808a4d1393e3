"""Pieces shared by the frontier optimizers (ademamix, mars, muon, soap, shampoo, psgd_kron).

Each optimizer is `chain(scale_by_<name>(...), decoupled weight decay, -learning_rate)`
under `optax.inject_hyperparams`, so the learning rate, betas and weight decay are arrays
in the state: changing them (`set_hyperparams`, a schedule) compiles nothing new, and a
traced value works. Hyperparameters are kept in float32 whatever the params' dtype, the
statistics are computed in float32, and the updates come back in each gradient's dtype
(a bfloat16 model gets bfloat16 updates computed from float32 state).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from . import elementwise
from .inject import injected
from .low_precision import stochastic_round_bf16

# The state fields holding per-param moments (`mu_dtype` stores them): first and second
# moments, AdEMAMix's slow EMA, Shampoo's momenta, MARS's previous gradient. Statistics,
# preconditioners and bases (Shampoo, SOAP, Kron) and Shampoo's graft statistics stay
# float32.
MOMENTS = ("mu", "nu", "m1", "m2", "momentum", "graft_momentum", "prev_grad")
MOMENT_DTYPES = ("float32", "bfloat16")


def inject(factory, static=(), **hyperparams):
    """`factory(**hyperparams)` injected as every jaxtrain optimizer is (`inject.injected`:
    numbers held in float32, arrays used as given, e.g. inside an outer
    `optax.inject_hyperparams`), the names in `static` (shapes, strings, masks) left as
    Python values."""
    static = tuple(k for k in hyperparams if k in static)
    return injected(factory, static, jnp.float32, **hyperparams)


def finish(scale, learning_rate, weight_decay=0.0, mask=None):
    """`scale`, then AdamW-style decoupled decay (`-lr * wd * param`, where `mask` says),
    then `-learning_rate`; the output cast back to the gradients' dtypes."""
    tx = elementwise.finish(scale, learning_rate, weight_decay, mask)

    def update(updates, state, params=None):
        out, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates), state

    return optax.GradientTransformation(tx.init, update)


def f32(x):
    """`x` in float32 (the dtype the statistics are computed in)."""
    return jnp.asarray(x, jnp.float32)


def zeros_f32(params, dtype=None):
    """Zeros shaped and sharded like `params`, in `dtype` (float32 when None)."""
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype or jnp.float32), params)


def in_f32(tx):
    """`tx` fed float32 updates, its state built from float32 params (an Optax transform
    such as `scale_by_adam` keeps some moments in the params' dtype otherwise)."""

    def init(params):
        return tx.init(jax.tree.map(f32, params))

    def update(updates, state, params=None):
        return tx.update(jax.tree.map(f32, updates), state, params)

    return optax.GradientTransformation(init, update)


def check_mu_dtype(owner: str, mu_dtype):
    """`mu_dtype` (None, a dtype or its name) as a dtype, or None for float32; else a
    one-line error naming `owner` and the valid set."""
    if mu_dtype is None:
        return None
    try:
        name = jnp.dtype(mu_dtype).name
    except TypeError:
        name = None
    if name not in MOMENT_DTYPES:
        raise JaxtrainError(f"{owner}: mu_dtype must be one of {', '.join(MOMENT_DTYPES)} "
                            f"(or None: float32), got {mu_dtype!r}")
    return None if name == "float32" else jnp.dtype(name)


class StoredMomentsState(NamedTuple):
    count: jax.Array  # steps taken: keys the stochastic rounding
    inner: optax.OptState


def _is_moment(path, x) -> bool:
    return (jnp.issubdtype(x.dtype, jnp.floating) and
            any(isinstance(k, jax.tree_util.GetAttrKey) and k.name in MOMENTS for k in path))


def store_moments(tx, dtype, seed: int = 0):
    """`tx` (its moments computed and built in float32) with its per-param moments
    (`MOMENTS`) stored in `dtype` between steps: read back to float32 before each update,
    written with an unbiased stochastic rounding (bits from `fold_in(PRNGKey(seed),
    step)`). Rounded to nearest, a slow moving average stalls: b*m + (1-b)*g moves m by
    (1-b) of its size, under bfloat16's half unit in the last place (2^-9) for b above
    ~0.998 (AdEMAMix's b3 = 0.9999, Adam's b2 = 0.999), so every step rounds back to the
    old m. `dtype`: bfloat16, or None: `tx` itself (`check_mu_dtype`)."""
    if dtype is None:
        return tx

    def cast(state, fn):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: fn(x) if _is_moment(path, x) else x, state)

    def init(params):
        return StoredMomentsState(jnp.zeros([], jnp.int32),
                                  cast(tx.init(params), lambda x: x.astype(dtype)))

    def update(updates, state, params=None):
        count = optax.safe_increment(state.count)
        out, inner = tx.update(updates, cast(state.inner, f32), params)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
        flat, treedef = jax.tree_util.tree_flatten_with_path(inner)
        stored = [stochastic_round_bf16(x, jax.random.fold_in(key, i))
                  if _is_moment(path, x) else x for i, (path, x) in enumerate(flat)]
        return out, StoredMomentsState(count, treedef.unflatten(stored))

    return optax.GradientTransformation(init, update)
