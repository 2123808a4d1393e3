"""Pieces shared by the frontier optimizers (ademamix, mars, muon, soap, shampoo, psgd_kron).

Each optimizer is `chain(scale_by_<name>(...), decoupled weight decay, -learning_rate)`
under `optax.inject_hyperparams`, so the learning rate, betas and weight decay are arrays
in the state: changing them (`set_hyperparams`, a schedule) compiles nothing new, and a
traced value works. Hyperparameters are kept in float32 whatever the params' dtype, the
statistics are computed in float32, and the updates come back in each gradient's dtype
(a bfloat16 model gets bfloat16 updates computed from float32 state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .inject import injected


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
    tx = optax.chain(
        scale,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )

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
