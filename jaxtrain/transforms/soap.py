"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam
run in the eigenbasis of Shampoo's preconditioner, as the authors' code does it.

Per leaf, for each axis i of size <= `max_precondition_dim` (1-D leaves only with
`precondition_1d`), a statistic L_i = shampoo_beta*L_i + (1-shampoo_beta)*G_(i) G_(i)^T
(G_(i): the gradient unfolded along i) and an orthogonal basis Q_i of it. With
`rotate(x) = x x_i Q_i^T` over the axes (and its inverse):

    m = b1*m + (1-b1)*g          (in the parameter basis)
    v = b2*v + (1-b2)*rotate(g)^2  (in the eigenbasis)
    theta -= lr * sqrt(1-b2^s)/(1-b1^s) * unrotate(rotate(m) / (sqrt(v) + eps)) + lr*wd*theta

The first step only gathers L_i and takes Q_i from an eigendecomposition (it moves no
param and decays nothing, as in the authors' code; s counts the steps after it). Every
`precondition_frequency` steps Q_i is refreshed by one power iteration and a QR
decomposition (v permuted to follow the new order of the eigenvalues). Statistics,
bases and decompositions are float32 whatever the params' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._frontier import f32, finish, inject, zeros_f32
from .validate import (
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    with_mask_check,
)


class ScaleBySoapState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    stats: list  # per leaf: a tuple, per axis, of a (d, d) statistic or None
    bases: list  # per leaf: a tuple, per axis, of a (d, d) orthogonal basis or None


def _axes(shape, max_dim, precondition_1d):
    """Which axes of a leaf of `shape` are preconditioned."""
    if len(shape) == 1 and not precondition_1d:
        return (False,)
    return tuple(d <= max_dim for d in shape)


def _rotate(x, bases, back=False):
    """x multiplied along each axis by Q^T (or Q when `back`); None leaves an axis alone."""
    for q in bases:
        x = jnp.moveaxis(x, 0, -1) if q is None else jnp.tensordot(
            x, q, axes=([0], [1 if back else 0]))
    return x


def _outer(g, axis):
    rest = [a for a in range(g.ndim) if a != axis]
    return jnp.tensordot(g, g, axes=(rest, rest))


def _eigenbasis(stat):
    """Eigenvectors of `stat`, largest eigenvalue first."""
    return jnp.flip(jnp.linalg.eigh(stat)[1], axis=1)


def _refresh(stats, bases, nu):
    """One power iteration + QR per axis; v follows the new eigenvalue order."""
    new = []
    for i, (s, q) in enumerate(zip(stats, bases, strict=True)):
        if s is None:
            new.append(None)
            continue
        sq = s @ q
        order = jnp.argsort(-jnp.sum(q * sq, axis=0))
        nu = jnp.take(nu, order, axis=i)
        new.append(jnp.linalg.qr(sq[:, order])[0])
    return tuple(new), nu


def scale_by_soap(b1=0.95, b2=0.95, shampoo_beta=None, eps=1e-8, precondition_frequency=10,
                  max_precondition_dim=10000, precondition_1d=False, mu_dtype=None):
    """The SOAP direction (before the learning rate); see the module docstring."""

    def init(params):
        leaves = jax.tree.leaves(params)
        stats = [tuple(jnp.zeros((d, d), jnp.float32) if on else None
                       for d, on in zip(p.shape, _axes(p.shape, max_precondition_dim,
                                                       precondition_1d), strict=True))
                 for p in leaves]
        return ScaleBySoapState(jnp.zeros([], jnp.int32), zeros_f32(params, mu_dtype),
                                zeros_f32(params, mu_dtype), stats,
                                [tuple(None if s is None else jnp.eye(s.shape[0], dtype=s.dtype)
                                       for s in st) for st in stats])

    def update(updates, state, params=None):
        del params
        sb = f32(b2 if shampoo_beta is None else shampoo_beta)
        grads, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        s = state.count.astype(jnp.float32)  # steps taken after the first
        step_size = jnp.sqrt(1 - f32(b2) ** s) / (1 - f32(b1) ** s)
        refresh_now = (state.count > 0) & (state.count % precondition_frequency == 0)
        outs, new_mu, new_nu, new_stats, new_bases = [], [], [], [], []
        for g, m, v, stats, bases in zip(grads, mus, nus, state.stats, state.bases,
                                         strict=True):
            g32 = f32(g)

            def gather(stats, g32=g32):
                return tuple(None if st is None else sb * st + (1 - sb) * _outer(g32, i)
                             for i, st in enumerate(stats))

            def first(m, v, stats, bases, g32=g32):
                stats = gather(stats)
                bases = tuple(None if st is None else _eigenbasis(st) for st in stats)
                return jnp.zeros_like(g32), m, v, stats, bases

            def later(m, v, stats, bases, g32=g32):
                m = f32(b1) * f32(m) + (1 - f32(b1)) * g32
                v = f32(b2) * f32(v) + (1 - f32(b2)) * jnp.square(_rotate(g32, bases))
                u = _rotate(_rotate(m, bases) / (jnp.sqrt(v) + eps), bases, back=True)
                stats = gather(stats)
                bases, v = jax.lax.cond(refresh_now, _refresh, lambda s_, b_, v_: (b_, v_),
                                        stats, bases, v)
                return step_size * u, m, v, stats, bases

            u, m, v, stats, bases = jax.lax.cond(state.count == 0, first, later,
                                                 m, v, stats, bases)
            outs.append(u)
            new_mu.append(m)
            new_nu.append(v)
            new_stats.append(stats)
            new_bases.append(bases)
        cast = lambda new, old: treedef.unflatten(
            [a.astype(b.dtype) for a, b in zip(new, old, strict=True)])
        return treedef.unflatten(outs), ScaleBySoapState(
            optax.safe_increment(state.count), cast(new_mu, mus), cast(new_nu, nus),
            new_stats, new_bases)

    return optax.GradientTransformation(init, update)


def _after_first_step(tx):
    """`tx` whose first update is zero (decay included): SOAP's first step only gathers."""

    def init(params):
        return (jnp.zeros([], jnp.int32), tx.init(params))

    def update(updates, state, params=None):
        count, inner = state
        out, inner = tx.update(updates, inner, params)
        out = jax.tree.map(lambda u: jnp.where(count == 0, jnp.zeros_like(u), u), out)
        return out, (optax.safe_increment(count), inner)

    return optax.GradientTransformation(init, update)


def _soap(learning_rate, b1, b2, shampoo_beta, eps, weight_decay, mask, precondition_frequency,
          max_precondition_dim, precondition_1d, mu_dtype):
    return _after_first_step(finish(scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency,
                                max_precondition_dim, precondition_1d, mu_dtype),
                  learning_rate, weight_decay, mask))


def soap(
    learning_rate=3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask=None,
    precondition_frequency: int = 10,
    max_precondition_dim: int = 10000,
    precondition_1d: bool = False,
    mu_dtype=None,
):
    """SOAP with the authors' defaults (`shampoo_beta=None` uses b2). Decay is AdamW's
    (-lr*wd*theta, theta before the step); the authors' code decays theta after the step,
    a difference of lr^2*wd*update."""
    check_learning_rate(learning_rate)
    check_unit_interval("soap", b1=b1, b2=b2,
                        **({} if shampoo_beta is None else {"shampoo_beta": shampoo_beta}))
    check_positive("soap", eps=eps)
    check_nonnegative("soap", weight_decay=weight_decay)
    for name, value in (("precondition_frequency", precondition_frequency),
                        ("max_precondition_dim", max_precondition_dim)):
        if not isinstance(value, int) or value < 1:
            from ..errors import JaxtrainError

            raise JaxtrainError(f"soap: {name} must be an integer >= 1, got {value!r}")
    tx = inject(
        _soap, static=("mask", "precondition_frequency", "max_precondition_dim",
                       "precondition_1d", "mu_dtype"),
        learning_rate=learning_rate, b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
        weight_decay=weight_decay, mask=mask, precondition_frequency=precondition_frequency,
        max_precondition_dim=max_precondition_dim, precondition_1d=precondition_1d,
        mu_dtype=mu_dtype,
    )
    return with_mask_check(tx, mask, "soap: mask")
