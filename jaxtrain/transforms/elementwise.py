"""Optax's elementwise updates with each runtime hyperparameter broadcast once per leaf shape.

Injected hyperparameters are runtime scalars. Written as Optax writes them, `(1 - b1) * g
+ b1 * m` computes `1 - b1` again for every leaf, and JAX lowers every scalar-times-array
product with a broadcast of its own (constants it shares): the step's HLO carries 6-9 more
instructions per leaf than with constant hyperparameters, and every XLA pass pays for them
(lion on 1,000 leaves: 22 instructions per leaf against 14, compile 1.5x the CPU time of
`optax.lion`, benchmarks/RESULTS.md). Here the scalars are computed once per step and
broadcast once per distinct leaf shape. The operations and their order are Optax's, so
the values are the same bit for bit (tests/test_optimizers_elementwise.py); the states are
Optax's too. A mask or a schedule (not a number) takes Optax's own update.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import optax


def by_shape(leaves, **scalars) -> list[SimpleNamespace]:
    """For each of `leaves`, `scalars` broadcast to its shape (kept in their own dtypes, so
    that type promotion is Optax's), one broadcast per distinct shape."""
    cache = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = SimpleNamespace(
                **{k: jnp.broadcast_to(v, shape) for k, v in scalars.items()})
        return cache[shape]

    return [get(jnp.shape(x)) for x in leaves]


def _plain(*hyperparams) -> bool:
    """Whether every one of `hyperparams` is a value (not a schedule)."""
    return not any(callable(h) for h in hyperparams)


def _decay_and_scale(updates, params, learning_rate, weight_decay=None):
    """`optax.add_decayed_weights(weight_decay)` (skipped when None), then
    `optax.scale_by_learning_rate(learning_rate)`, on leaf lists."""
    s = by_shape(updates, step=-1 * learning_rate,
                 **({} if weight_decay is None else {"wd": weight_decay}))
    if weight_decay is not None:
        updates = [g + c.wd * p for g, p, c in zip(updates, params, s, strict=True)]
    return [c.step * g for g, c in zip(updates, s, strict=True)]


def finish(scale, learning_rate, weight_decay, mask=None):
    """`chain(scale, add_decayed_weights(weight_decay, mask), scale_by_learning_rate(
    learning_rate))` (Optax's state; `weight_decay=None`: no decay step, as `optax.adam`),
    the last two sharing their broadcasts."""
    decayed = () if weight_decay is None else (optax.add_decayed_weights(weight_decay, mask),)
    tx = optax.chain(scale, *decayed, optax.scale_by_learning_rate(learning_rate))
    if mask is not None or not _plain(learning_rate, weight_decay):
        return tx
    # a constant zero: no decay (as Optax skips it)
    decay = None if isinstance(weight_decay, int | float) and weight_decay == 0 else weight_decay

    def update(updates, state, params=None):
        if params is None and decay is not None:
            return tx.update(updates, state, params)  # Optax's error
        out, inner = scale.update(updates, state[0], params)
        flat, treedef = jax.tree.flatten(out)
        ps = None if decay is None else treedef.flatten_up_to(params)
        return treedef.unflatten(_decay_and_scale(flat, ps, learning_rate, decay)), (
            inner, *state[1:])

    return optax.GradientTransformation(tx.init, update)


def scale_by_lion(b1, b2, mu_dtype=None):
    """`optax.scale_by_lion`."""
    base = optax.scale_by_lion(b1, b2, mu_dtype)

    def update(updates, state, params=None):
        del params
        gs, treedef = jax.tree.flatten(updates)
        ms = treedef.flatten_up_to(state.mu)
        s = by_shape(gs, b1=b1, c1=1.0 - b1, b2=b2, c2=1 - b2)
        out = [jnp.sign(c.c1 * g + c.b1 * m) for g, m, c in zip(gs, ms, s, strict=True)]
        mu = [c.c2 * g + c.b2 * m for g, m, c in zip(gs, ms, s, strict=True)]
        mu = optax.tree.cast(treedef.unflatten(mu), mu_dtype)
        return treedef.unflatten(out), optax.ScaleByLionState(
            optax.safe_increment(state.count), mu)

    return optax.GradientTransformation(base.init, update)


def lion(learning_rate, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3, mask=None):
    """`optax.lion`."""
    return finish(scale_by_lion(b1, b2, mu_dtype), learning_rate, weight_decay, mask)


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, nesterov=False):
    """`optax.scale_by_adam`; Nesterov's variant is Optax's own."""
    base = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
    if nesterov:
        return base

    def update(updates, state, params=None):
        del params
        gs, treedef = jax.tree.flatten(updates)
        ms, vs = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        count = optax.safe_increment(state.count)
        s = by_shape(gs, b1=b1, c1=1 - b1, b2=b2, c2=1 - b2, bc1=1 - b1**count,
                     bc2=1 - b2**count, eps=eps, eps_root=eps_root)
        mu = [c.c1 * g + c.b1 * m for g, m, c in zip(gs, ms, s, strict=True)]
        nu = [c.c2 * g**2 + c.b2 * v for g, v, c in zip(gs, vs, s, strict=True)]
        out = [(m / c.bc1.astype(m.dtype)) / (jnp.sqrt(v / c.bc2.astype(v.dtype) + c.eps_root)
                                               + c.eps)
               for m, v, c in zip(mu, nu, s, strict=True)]
        mu = optax.tree.cast(treedef.unflatten(mu), mu_dtype)
        nu = optax.tree.cast_like(treedef.unflatten(nu), state.nu)
        return treedef.unflatten(out), optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(base.init, update)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
         nesterov=False):
    """`optax.adam`."""
    return finish(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov), learning_rate,
                  None)


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
          weight_decay=1e-4, mask=None, *, nesterov=False):
    """`optax.adamw`."""
    return finish(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov), learning_rate,
                  weight_decay, mask)


def scale_by_ademamix(b1=0.9, b2=0.999, b3=0.9999, alpha=6.0, eps=1e-8, eps_root=0.0,
                      mu_dtype=None):
    """`optax.contrib.scale_by_ademamix`."""
    base = optax.contrib.scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype)

    def update(updates, state, params=None):
        del params
        c_b3 = b3(state.count_m2) if callable(b3) else b3
        c_alpha = alpha(state.count_m2) if callable(alpha) else alpha
        gs, treedef = jax.tree.flatten(updates)
        m1s, m2s, vs = (treedef.flatten_up_to(x) for x in (state.m1, state.m2, state.nu))
        count = optax.safe_increment(state.count)
        s = by_shape(gs, b1=b1, c1=1 - b1, b2=b2, c2=1 - b2, b3=c_b3, c3=1 - c_b3,
                     bc1=1 - b1**count, bc2=1 - b2**count, alpha=c_alpha, eps=eps,
                     eps_root=eps_root)
        m1 = [c.c1 * g + c.b1 * m for g, m, c in zip(gs, m1s, s, strict=True)]
        m2 = [c.c3 * g + c.b3 * m for g, m, c in zip(gs, m2s, s, strict=True)]
        nu = [c.c2 * g**2 + c.b2 * v for g, v, c in zip(gs, vs, s, strict=True)]
        out = [(a / c.bc1.astype(a.dtype) + c.alpha * b)
               / (jnp.sqrt(v / c.bc2.astype(v.dtype) + c.eps_root) + c.eps)
               for a, b, v, c in zip(m1, m2, nu, s, strict=True)]
        m1, m2, nu = (treedef.unflatten(x) for x in (m1, m2, nu))
        return treedef.unflatten(out), state._replace(
            count=count, count_m2=optax.safe_int32_increment(state.count_m2), m1=m1, m2=m2,
            nu=nu)

    return optax.GradientTransformation(base.init, update)
