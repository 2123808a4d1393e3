"""PSGD Kron (Li, 2015-2024, "Preconditioned Stochastic Gradient Descent"; the Kronecker-
factored form popularized by Evan Walters' `kron`): momentum preconditioned by
P = Q^T Q, Q a Kronecker product of one factor per axis (upper triangular, or diagonal for
axes of size 1 or above `max_size_triangular`, 1-D leaves and `memory_save_mode`), fitted
online so that P matches the gradient noise: no eigendecomposition, no inverse root.

Per step, with m = b1*m + (1-b1)*g and m_hat = m/(1-b1^t):

* when the update schedule says so (probability `update_prob`, by default 1 for 500
  steps then decaying as exp(-0.001*(t-500)) to 0.03; taken on a deterministic counter:
  every ceil(1/p)-th step), each Q_i takes one step of size `precond_lr` on Li's
  criterion with a fresh normal vector V: A = Q m_hat, B = Q^-T V (per axis),
  Q_i -= lr * triu(A_(i)A_(i)^T - B_(i)B_(i)^T) Q_i / ||A_(i)A_(i)^T + B_(i)B_(i)^T||
  (a lower bound of the spectral norm for triangular factors, the max for diagonal ones);
* every `balance_every` updates the factors are rescaled to equal norms (P unchanged);
* u = P m_hat, scaled down to an RMS of at most 1.1; theta -= lr*(u + wd*theta), the
  decay only on leaves of 2 or more axes unless `mask` says otherwise.

The noise V of leaf i at step t is `kron_noise(key, t, i, shape)`: reproducible from
`seed`, and what the tests feed to `pytorch_optimizer.Kron`. Factors are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import JaxtrainError
from ._frontier import check_mu_dtype, f32, finish, inject, store_moments, zeros_f32
from .branch import vmappable_cond
from .validate import check_learning_rate, check_nonnegative, check_unit_interval, with_mask_check

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
_TINY = float(jnp.finfo(jnp.bfloat16).tiny)


def update_prob_schedule(max_prob=1.0, min_prob=0.03, decay=0.001, flat_start=500):
    """p(t) = clip(max_prob * exp(-decay * (t - flat_start)), min_prob, max_prob)."""
    return lambda t: jnp.clip(max_prob * jnp.exp(-decay * (t - flat_start)), min_prob, max_prob)


def kron_noise(key, count, index, shape):
    """The normal vector of leaf `index` at step `count` (0-based)."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, count), index), shape,
                             jnp.float32)


def _diagonal_axes(shape, max_size, min_ndim, memory_save_mode):
    """Per axis: whether its factor is diagonal."""
    if len(shape) == 0:
        return ()
    big = int(np.argsort(shape)[::-1][0])
    forced = [False] * len(shape)
    if memory_save_mode == "one_diag":
        forced[big] = True
    elif memory_save_mode == "smart_one_diag":
        ordered = sorted(shape)
        if len(shape) >= 2 and ordered[-1] > ordered[-2]:
            forced[big] = True
    elif memory_save_mode == "all_diag":
        forced = [True] * len(shape)
    return tuple(d == 1 or d > max_size or len(shape) < min_ndim or f
                 for d, f in zip(shape, forced, strict=True))


def _along(x, axis, fn):
    """fn applied to x's `axis` moved last (fn: (..., d) -> (..., d))."""
    return jnp.moveaxis(fn(jnp.moveaxis(x, axis, -1)), -1, axis)


def _apply_q(qs, x):
    """Q x: each axis multiplied by its factor (a[i] = sum_n Q[i, n] x[n])."""
    for i, q in enumerate(qs):
        x = _along(x, i, (lambda y, q=q: y * q) if q.ndim == 1 else
                   (lambda y, q=q: y @ q.T))
    return x


def _solve_qt(qs, v):
    """Q^-T v: along each axis, v Q^-1 (a triangular solve, or a division)."""
    for i, q in enumerate(qs):
        if q.ndim == 1:
            v = _along(v, i, lambda y, q=q: y / q)
        else:
            v = _along(v, i, lambda y, q=q: jax.scipy.linalg.solve_triangular(
                q, y.reshape(-1, y.shape[-1]).T, trans="T", lower=False).T.reshape(y.shape))
    return v


def _precondition(qs, x):
    """P x = Q^T Q x along each axis."""
    for i, q in enumerate(qs):
        x = _along(x, i, (lambda y, q=q: y * q * q) if q.ndim == 1 else
                   (lambda y, q=q: y @ (q.T @ q).T))
    return x


def _gram(x, axis, diagonal):
    rest = [a for a in range(x.ndim) if a != axis]
    if diagonal:
        return jnp.sum(x * x, axis=tuple(rest))
    return jnp.tensordot(x, x, axes=(rest, rest))


def norm_lower_bound(a):
    """A lower bound of the spectral norm of the symmetric matrix `a` (Li's estimate: one
    power step from its largest row or column)."""
    max_abs = jnp.max(jnp.abs(a))
    a = a / jnp.where(max_abs > 0, max_abs, 1.0)
    aa = a * a
    col, row = jnp.sum(aa, axis=0), jnp.sum(aa, axis=1)
    i, j = jnp.argmax(col), jnp.argmax(row)
    tiny = jnp.finfo(jnp.float32).tiny
    x0 = a[:, i] @ a
    bound0 = jnp.linalg.norm((x0 / jnp.maximum(jnp.linalg.norm(x0), tiny)) @ a.T)
    x1 = a @ a[j, :]
    bound1 = jnp.linalg.norm(a.T @ (x1 / jnp.maximum(jnp.linalg.norm(x1), tiny)))
    return max_abs * jnp.where(col[i] > row[j], bound0, bound1)


def _update_factors(qs, m, v, lr):
    a, b = _apply_q(qs, m), _solve_qt(qs, v)
    new = []
    for i, q in enumerate(qs):
        t1, t2 = _gram(a, i, q.ndim == 1), _gram(b, i, q.ndim == 1)
        if q.ndim == 1:
            new.append(q - lr * (t1 - t2) * q / (jnp.max(jnp.abs(t1 + t2)) + _TINY))
        else:
            step = jnp.triu(t1 - t2) * lr / (norm_lower_bound(t1 + t2) + _TINY)
            new.append(q - step @ q)
    return tuple(new)


def _balance(qs):
    norms = jnp.stack([jnp.max(jnp.abs(q)) for q in qs])
    mean = jnp.prod(norms) ** (1.0 / len(qs))
    return tuple(q * (mean / n) for q, n in zip(qs, norms, strict=True))


class ScaleByKronState(NamedTuple):
    count: jax.Array
    counter: jax.Array  # steps since the last preconditioner update
    updates_done: jax.Array
    key: jax.Array
    mu: optax.Updates
    factors: list  # per leaf: a tuple of per-axis factors


def scale_by_kron(b1=0.9, precond_lr=0.1, precond_init_scale=1.0, update_prob=None,
                  max_size_triangular=8192, min_ndim_triangular=2, memory_save_mode=None,
                  momentum_into_precond_update=True, balance_every=100, seed=0, mu_dtype=None):
    """The PSGD Kron direction (before the learning rate); see the module docstring."""
    schedule = update_prob_schedule() if update_prob is None else (
        update_prob if callable(update_prob) else (lambda t: jnp.asarray(update_prob)))

    def init(params):
        factors = []
        for p in jax.tree.leaves(params):
            shape = p.shape or (1,)
            scale = precond_init_scale ** (1.0 / len(shape))
            diag = _diagonal_axes(shape, max_size_triangular, min_ndim_triangular,
                                  memory_save_mode)
            factors.append(tuple(scale * (jnp.ones(d, jnp.float32) if dg else
                                          jnp.eye(d, dtype=jnp.float32))
                                 for d, dg in zip(shape, diag, strict=True)))
        return ScaleByKronState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                                jnp.zeros([], jnp.int32), jax.random.key(seed),
                                zeros_f32(params, mu_dtype), factors)

    def update(updates, state, params=None):
        del params
        prob = f32(schedule(state.count.astype(jnp.float32)))
        counter = state.counter + 1
        do_update = (prob > 0) & (counter.astype(jnp.float32) >= 1.0 / prob)
        balance = do_update & (state.updates_done % balance_every == balance_every - 1)
        count = optax.safe_increment(state.count)
        bc1 = 1 - f32(b1) ** count.astype(jnp.float32)
        grads, treedef = jax.tree.flatten(updates)
        out, mus, factors = [], [], []
        for i, (g, m, qs) in enumerate(zip(grads, treedef.flatten_up_to(state.mu),
                                           state.factors, strict=True)):
            g32 = f32(g).reshape(g.shape or (1,))
            m32 = f32(b1) * f32(m).reshape(g32.shape) + (1 - f32(b1)) * g32
            m_hat = m32 / bc1
            qs = vmappable_cond(balance & (g32.ndim > 1), _balance, lambda q: q, qs)
            v = kron_noise(state.key, state.count, i, g32.shape)
            target = m_hat if momentum_into_precond_update else g32
            qs = vmappable_cond(do_update, _update_factors, lambda q, t_, v_, lr_: q,
                                qs, target, v, f32(precond_lr))
            u = _precondition(qs, m_hat)
            u = u * jnp.minimum(1.1 / (jnp.sqrt(jnp.mean(u * u)) + 1e-6), 1.0)
            out.append(u.reshape(g.shape))
            mus.append(m32.reshape(g.shape).astype(m.dtype))
            factors.append(qs)
        return treedef.unflatten(out), ScaleByKronState(
            count, jnp.where(do_update, 0, counter), state.updates_done + do_update,
            state.key, treedef.unflatten(mus), factors)

    return optax.GradientTransformation(init, update)


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _psgd_kron(learning_rate, b1, weight_decay, mask, precond_lr, precond_init_scale,
               update_prob, max_size_triangular, min_ndim_triangular, memory_save_mode,
               momentum_into_precond_update, balance_every, seed, mu_dtype):
    scale = scale_by_kron(b1, precond_lr, precond_init_scale, update_prob, max_size_triangular,
                          min_ndim_triangular, memory_save_mode, momentum_into_precond_update,
                          balance_every, seed, None)
    return store_moments(finish(scale, learning_rate, weight_decay,
                                _matrices if mask is None else mask), mu_dtype, seed)


def psgd_kron(
    learning_rate=1e-3,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    mask=None,
    precond_lr: float = 0.1,
    precond_init_scale: float = 1.0,
    update_prob=None,
    max_size_triangular: int = 8192,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    momentum_into_precond_update: bool = True,
    balance_every: int = 100,
    seed: int = 0,
    mu_dtype=None,
):
    """PSGD with Kronecker-factored preconditioners (module docstring). `update_prob`: a
    number, a schedule `step -> probability`, or None for the default schedule. `mu_dtype`
    stores the momentum (float32 by default; bfloat16 with stochastic rounding,
    `_frontier.store_moments`); the factors stay float32."""
    check_learning_rate(learning_rate)
    mu_dtype = check_mu_dtype("psgd_kron", mu_dtype)
    check_unit_interval("psgd_kron", b1=b1)
    check_nonnegative("psgd_kron", weight_decay=weight_decay, precond_lr=precond_lr,
                      precond_init_scale=precond_init_scale)
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise JaxtrainError(f"psgd_kron: memory_save_mode must be one of "
                            f"{MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
    if update_prob is not None and not callable(update_prob) and not 0 < update_prob <= 1:
        raise JaxtrainError(f"psgd_kron: update_prob must be in (0, 1], a schedule or None, "
                            f"got {update_prob!r}")
    tx = inject(
        _psgd_kron,
        static=("mask", "update_prob", "max_size_triangular", "min_ndim_triangular",
                "memory_save_mode", "momentum_into_precond_update", "balance_every", "seed",
                "mu_dtype", "precond_init_scale"),
        learning_rate=learning_rate, b1=b1, weight_decay=weight_decay, mask=mask,
        precond_lr=precond_lr, precond_init_scale=precond_init_scale, update_prob=update_prob,
        max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
        memory_save_mode=memory_save_mode,
        momentum_into_precond_update=momentum_into_precond_update,
        balance_every=balance_every, seed=seed, mu_dtype=mu_dtype,
    )
    return with_mask_check(tx, mask, "psgd_kron: mask")
