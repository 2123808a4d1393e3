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

`block_size=b` (default None: whole leaves, as above) is blocked SOAP: each leaf's dims
merged up to b and cut into b-blocks as Shampoo's, and each block a SOAP of its own.
Leaves or blocks of one shape are stacked, and the stacks split across the devices of
the mesh in use (`blocks`); `num_devices` pads the stacks to a multiple of it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._frontier import check_mu_dtype, f32, finish, inject, store_moments, zeros_f32
from .blocks import Grid, Plan, Stacks, per_block, spread
from .branch import vmappable_cond
from .shampoo import merge_small_dims
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
    stats: Stacks  # per block shape: per axis, (blocks, d, d) statistics or None
    bases: Stacks  # per block shape: per axis, (blocks, d, d) orthogonal bases or None


def _axes(shape, max_dim, precondition_1d):
    """Which axes of a block of `shape` are preconditioned."""
    if len(shape) == 1 and not precondition_1d:
        return (False,)
    return tuple(d <= max_dim for d in shape)


def _layout(shape, block_size):
    """How a leaf is cut into blocks: whole (`block_size` None), or its dims merged up to
    `block_size` and cut into blocks of it, as Shampoo's; None for an empty leaf."""
    if 0 in shape:
        return None
    if block_size is None:
        return Grid(tuple(shape), tuple(shape), max(shape, default=1))
    return Grid(tuple(shape), tuple(merge_small_dims(shape, block_size)), block_size)


def _rotate(x, bases, back=False):
    """x multiplied along each axis by Q^T (or Q when `back`); None leaves an axis alone."""
    for q in bases:
        x = jnp.moveaxis(x, 0, -1) if q is None else jnp.tensordot(
            x, q, axes=([0], [1 if back else 0]))
    return x


def _outer(g, axis):
    rest = [a for a in range(g.ndim) if a != axis]
    return jnp.tensordot(g, g, axes=(rest, rest))


def _gather(stats, g, sb):
    return tuple(None if st is None else sb * st + (1 - sb) * _outer(g, i)
                 for i, st in enumerate(stats))


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


def _direction(m, v, bases, g, b2, eps):
    """One block's Adam step in its eigenbasis (before the step size), and the new v."""
    v = b2 * v + (1 - b2) * jnp.square(_rotate(g, bases))
    return _rotate(_rotate(m, bases) / (jnp.sqrt(v) + eps), bases, back=True), v


def _spread(tree):
    return jax.tree.map(spread, tree)


def scale_by_soap(b1=0.95, b2=0.95, shampoo_beta=None, eps=1e-8, precondition_frequency=10,
                  max_precondition_dim=10000, precondition_1d=False, mu_dtype=None,
                  block_size=None, num_devices=1):
    """The SOAP direction (before the learning rate); see the module docstring. The blocks
    of all leaves (whole leaves when `block_size` is None) are stacked by shape and spread
    over the devices (`blocks`); each stack is padded to a multiple of `num_devices`."""

    def plan(leaves):
        return Plan([_layout(p.shape, block_size) for p in leaves], num_devices)

    def init(params):
        p = plan(jax.tree.leaves(params))
        on = {k: _axes(shape, max_precondition_dim, precondition_1d)
              for k, shape in p.shapes.items()}

        def per_axis(make):
            return Stacks({k: tuple(make(n, d) if o else None
                                    for d, o in zip(p.shapes[k], on[k], strict=True))
                           for k, n in p.sizes.items()})

        return ScaleBySoapState(
            jnp.zeros([], jnp.int32), zeros_f32(params, mu_dtype), zeros_f32(params, mu_dtype),
            per_axis(lambda n, d: jnp.zeros((n, d, d), jnp.float32)),
            per_axis(lambda n, d: jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (n, d, d))))

    def update(updates, state, params=None):
        del params
        sb = f32(b2 if shampoo_beta is None else shampoo_beta)
        beta1, beta2 = f32(b1), f32(b2)
        grads, treedef = jax.tree.flatten(updates)
        grads = [f32(g) for g in grads]
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        s = state.count.astype(jnp.float32)  # steps taken after the first
        step_size = jnp.sqrt(1 - beta2 ** s) / (1 - beta1 ** s)
        first = state.count == 0  # it only gathers statistics and takes their eigenbases
        refresh_now = (state.count > 0) & (state.count % precondition_frequency == 0)
        # m in the parameter basis (elementwise, where the leaf lives); the rest per block.
        mus = [jnp.where(first, f32(m), beta1 * f32(m) + (1 - beta1) * g)
               for m, g in zip(mus, grads, strict=True)]
        p = plan(grads)
        gs, ms, vs = p.stack(grads), p.stack(mus), p.stack([f32(v) for v in nus])
        us, new_v, stats, bases = {}, {}, {}, {}
        for k in gs:
            stats[k] = _spread(jax.vmap(_gather, (0, 0, None))(state.stats.arrays[k],
                                                               gs[k], sb))

            def starting(m, v, g, stats, bases):
                return jnp.zeros_like(g), v, tuple(
                    None if x is None else per_block(_eigenbasis)(x) for x in stats)

            def later(m, v, g, stats, bases):
                u, v = jax.vmap(_direction, (0, 0, 0, 0, None, None))(m, v, bases, g, beta2,
                                                                      eps)
                bases, v = vmappable_cond(refresh_now, per_block(_refresh),
                                          lambda s_, b_, v_: (b_, v_), stats, bases, v)
                return step_size * u, v, bases

            us[k], new_v[k], bases[k] = _spread(vmappable_cond(
                first, starting, later, ms[k], vs[k], gs[k], stats[k], state.bases.arrays[k]))
        outs = [jnp.zeros_like(g) if u is None else u
                for u, g in zip(p.unstack(us), grads, strict=True)]
        nus = [f32(v) if new is None else new
               for new, v in zip(p.unstack(new_v), nus, strict=True)]
        cast = lambda new, old: treedef.unflatten(
            [a.astype(b.dtype) for a, b in zip(new, treedef.flatten_up_to(old), strict=True)])
        return treedef.unflatten(outs), ScaleBySoapState(
            optax.safe_increment(state.count), cast(mus, state.mu), cast(nus, state.nu),
            Stacks(stats), Stacks(bases))

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
          max_precondition_dim, precondition_1d, mu_dtype, block_size, num_devices):
    return store_moments(_after_first_step(finish(
        scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency, max_precondition_dim,
                      precondition_1d, None, block_size, num_devices),
        learning_rate, weight_decay, mask)), mu_dtype)


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
    block_size: int | None = None,
    num_devices: int = 1,
):
    """SOAP with the authors' defaults (`shampoo_beta=None` uses b2). Decay is AdamW's
    (-lr*wd*theta, theta before the step); the authors' code decays theta after the step,
    a difference of lr^2*wd*update. `mu_dtype` stores both moments (float32 by default;
    bfloat16 with stochastic rounding, `_frontier.store_moments`)."""
    check_learning_rate(learning_rate)
    mu_dtype = check_mu_dtype("soap", mu_dtype)
    check_unit_interval("soap", b1=b1, b2=b2,
                        **({} if shampoo_beta is None else {"shampoo_beta": shampoo_beta}))
    check_positive("soap", eps=eps)
    check_nonnegative("soap", weight_decay=weight_decay)
    for name, value in (("precondition_frequency", precondition_frequency),
                        ("max_precondition_dim", max_precondition_dim),
                        ("num_devices", num_devices),
                        *((("block_size", block_size),) if block_size is not None else ())):
        if not isinstance(value, int) or value < 1:
            from ..errors import JaxtrainError

            raise JaxtrainError(f"soap: {name} must be an integer >= 1, got {value!r}")
    tx = inject(
        _soap, static=("mask", "precondition_frequency", "max_precondition_dim",
                       "precondition_1d", "mu_dtype", "block_size", "num_devices"),
        learning_rate=learning_rate, b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
        weight_decay=weight_decay, mask=mask, precondition_frequency=precondition_frequency,
        max_precondition_dim=max_precondition_dim, precondition_1d=precondition_1d,
        mu_dtype=mu_dtype, block_size=block_size, num_devices=num_devices,
    )
    return with_mask_check(tx, mask, "soap: mask")
