"""Shampoo, blocked and grafted (Gupta et al., 2018; Anil et al., 2020, "Scalable Second
Order Optimization for Deep Learning": the Distributed Shampoo that won AlgoPerf's
external-tuning track).

Per leaf: dimensions are first merged while their product stays <= `block_size`
(`merge_small_dims`), then each axis is cut into blocks of `block_size`. For each block
and axis i, a statistic L_i = b2*L_i + (1-b2)*G_(i) G_(i)^T (plain sums when b2 = 1),
started at `matrix_eps`*I, and every `precondition_every` steps its inverse root
L_i^(-1/(2k)) (k = the block's number of axes), by an eigendecomposition in float32. The
preconditioned gradient of a block is G x_i L_i^(-1/(2k)) over its axes.

Grafting takes the update's size from a simple optimizer (`graft`: 'sgd', 'adagrad',
'rmsprop', 'sqrt_n' (sign), or 'none'): the Shampoo direction of each leaf is rescaled to
the norm of the graft's direction. Momentum (b1, heavy-ball sums, Nesterov by default) is
kept for both; before `start_preconditioning_step` the graft's momentum is applied, after
it Shampoo's. Leaves of one axis, and those with an axis above `max_preconditioner_dim`,
use the graft alone. Weight decay is decoupled (-lr*wd*theta).

The blocks of all leaves are stacked by shape and the stacks split across the devices of
the mesh in use (`blocks`: no device gathers whole matrices); `num_devices` pads the
stacks to a multiple of it, so that the statistics and roots split evenly.

This is the algorithm of `pytorch_optimizer.ScalableShampoo` (a port of Google's
`distributed_shampoo`) with `use_svd=True`, `decoupled_weight_decay=True`; the tests
compare them step by step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from ._frontier import check_mu_dtype, f32, finish, inject, store_moments, zeros_f32
from .blocks import Grid, Plan, Stacks, per_block, spread
from .branch import vmappable_cond
from .validate import check_learning_rate, check_nonnegative, check_unit_interval, with_mask_check

GRAFTS = ("sgd", "adagrad", "rmsprop", "sqrt_n", "none")


def merge_small_dims(shape, max_dim: int) -> list[int]:
    """Merge neighbouring dimensions while their product stays <= max_dim, dropping 1s, as
    Google's `distributed_shampoo` ([1, 2, 512, 1, 2048, 1, 3, 4] with 1024 -> [1024,
    2048, 12]; [8, 6] with 4 -> [8, 6], where `pytorch_optimizer`'s port gives [1, 8, 6])."""
    merged, product = [], 1
    for d in shape:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    return merged


def _layout(shape, block_size, merge_dims, max_dim):
    """How a leaf is cut into blocks (a `blocks.Grid`), or None when it gets the graft
    alone."""
    if len(shape) < 1 or any(d > max_dim for d in shape) or 0 in shape:
        return None
    merged = tuple(merge_small_dims(shape, block_size) if merge_dims else shape)
    if len(merged) < 2:
        return None
    return Grid(tuple(shape), merged, block_size)


class ScaleByShampooState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates  # Shampoo's
    graft_momentum: optax.Updates
    graft_stats: optax.Updates  # adagrad / rmsprop second moments (zeros otherwise)
    stats: Stacks  # per block shape: per axis, (blocks, d, d) statistics
    roots: Stacks  # per block shape: per axis, the (blocks, d, d) inverse roots in force


def _inverse_root(stat, p):
    """stat^(-1/p) in float32 through an eigendecomposition (|eigenvalues|, as the SVD
    of the symmetric positive semi-definite statistic gives)."""
    w, v = jnp.linalg.eigh(stat)
    w = jnp.maximum(jnp.abs(w), jnp.finfo(jnp.float32).tiny)
    return (v * w ** (-1.0 / p)) @ v.T


def _precondition_block(block, roots):
    for r in roots:
        block = jnp.tensordot(block, r, axes=([0], [0]))
    return block


def _statistic(block, axis):
    rest = [a for a in range(block.ndim) if a != axis]
    return jnp.tensordot(block, block, (rest, rest))


def scale_by_shampoo(b1=0.9, b2=0.999, block_size=128, graft="rmsprop", precondition_every=10,
                     start_preconditioning_step=10, matrix_eps=1e-6, diagonal_eps=1e-10,
                     nesterov=True, moving_average_for_momentum=False, merge_dims=True,
                     max_preconditioner_dim=8192, exponent_override=0, mu_dtype=None,
                     num_devices=1):
    """The grafted, blocked Shampoo direction (before the learning rate). The blocks of all
    leaves are stacked by shape and spread over the devices (`blocks`); each stack is
    padded to a multiple of `num_devices`."""

    def plan(leaves):
        return Plan([_layout(p.shape, block_size, merge_dims, max_preconditioner_dim)
                     for p in leaves], num_devices)

    def init(params):
        p = plan(jax.tree.leaves(params))

        def eyes(scale):
            return Stacks({k: tuple(scale * jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32),
                                                             (n, d, d)) for d in p.shapes[k])
                           for k, n in p.sizes.items()})

        return ScaleByShampooState(jnp.zeros([], jnp.int32), zeros_f32(params, mu_dtype),
                                   zeros_f32(params, mu_dtype), zeros_f32(params),
                                   eyes(matrix_eps), eyes(1.0))

    def precondition(p, grads, state, beta2, w2, recompute):
        """The Shampoo direction of every blocked leaf (None for the others), and the new
        statistics and roots: per stack of same-shaped blocks, on the devices holding them."""
        stacks = p.stack(grads)
        stats, roots, out = {}, {}, {}
        for k, blocks in stacks.items():
            rank = blocks.ndim - 1
            power = exponent_override or 2 * rank
            stats[k] = tuple(spread(beta2 * s + w2 * jax.vmap(_statistic, (0, None))(blocks, a))
                             for a, s in enumerate(state.stats.arrays[k]))
            roots[k] = tuple(spread(r) for r in vmappable_cond(
                recompute,
                lambda s, p_=power: tuple(per_block(lambda x_: _inverse_root(x_, p_))(x)
                                         for x in s),
                lambda s, old=state.roots.arrays[k]: old, stats[k]))
            out[k] = jax.vmap(_precondition_block)(blocks, roots[k])
        return p.unstack(out), Stacks(stats), Stacks(roots)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)  # 1-based step
        beta1, beta2 = f32(b1), f32(b2)
        w2 = jnp.where(beta2 == 1.0, 1.0, 1.0 - beta2)
        w = (1.0 - beta1) if moving_average_for_momentum else 1.0
        recompute = count % precondition_every == 0
        preconditioning = count >= start_preconditioning_step
        grads, treedef = jax.tree.flatten(updates)
        grads = [f32(g) for g in grads]
        shampoo_gs, stats, roots = precondition(plan(grads), grads, state, beta2, w2, recompute)
        flat = [treedef.flatten_up_to(t) for t in
                (state.momentum, state.graft_momentum, state.graft_stats)]
        out, moms, gmoms, gstats = [], [], [], []
        for g, mom, gmom, gstat, shampoo_g in zip(grads, *flat, shampoo_gs, strict=True):
            if graft == "adagrad":
                gstat = gstat + g * g
            elif graft == "rmsprop":
                gstat = beta2 * gstat + (1 - beta2) * g * g
            if graft in ("adagrad", "rmsprop"):
                graft_g = g / (jnp.sqrt(gstat) + diagonal_eps)
            elif graft == "sqrt_n":
                graft_g = jnp.sign(g)
            else:
                graft_g = g
            if shampoo_g is None:
                shampoo_g = graft_g
            if graft != "none":
                shampoo_g = shampoo_g * (jnp.linalg.norm(graft_g)
                                         / (jnp.linalg.norm(shampoo_g) + 1e-16))
            mom = beta1 * f32(mom) + w * shampoo_g
            gmom = beta1 * f32(gmom) + w * graft_g
            u = jnp.where(preconditioning, mom, gmom)
            if nesterov:
                u = beta1 * u + w * jnp.where(preconditioning, shampoo_g, graft_g)
            out.append(u)
            moms.append(mom)
            gmoms.append(gmom)
            gstats.append(gstat)
        cast = lambda new, old: treedef.unflatten(
            [a.astype(b.dtype) for a, b in zip(new, treedef.flatten_up_to(old), strict=True)])
        return treedef.unflatten(out), ScaleByShampooState(
            count, cast(moms, state.momentum), cast(gmoms, state.graft_momentum),
            treedef.unflatten(gstats), stats, roots)

    return optax.GradientTransformation(init, update)


def _shampoo(learning_rate, b1, b2, weight_decay, mask, block_size, graft, precondition_every,
             start_preconditioning_step, matrix_eps, diagonal_eps, nesterov,
             moving_average_for_momentum, merge_dims, max_preconditioner_dim, exponent_override,
             mu_dtype, num_devices):
    return store_moments(finish(
        scale_by_shampoo(b1, b2, block_size, graft, precondition_every,
                         start_preconditioning_step, matrix_eps, diagonal_eps, nesterov,
                         moving_average_for_momentum, merge_dims, max_preconditioner_dim,
                         exponent_override, None, num_devices),
        learning_rate, weight_decay, mask), mu_dtype)


def shampoo(
    learning_rate,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 0.0,
    mask=None,
    block_size: int = 128,
    graft: str = "adagrad",
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    matrix_eps: float = 1e-6,
    diagonal_eps: float = 1e-10,
    nesterov: bool = True,
    moving_average_for_momentum: bool = True,
    merge_dims: bool = True,
    max_preconditioner_dim: int = 8192,
    exponent_override: int = 0,
    mu_dtype=None,
    num_devices: int = 1,
):
    """Blocked, grafted Shampoo (module docstring). `b2` also decays the statistics
    (1.0: plain sums, AdaGrad-style). Defaults: AdaGrad grafting and momentum as a moving
    average (an update of the learning rate's size from the first step); the port's
    defaults (SGD grafting, summed momentum: 1/(1-b1) times larger steps) are one argument
    away. The 'rmsprop' graft is not bias-corrected (as Google's): its first steps are
    1/sqrt(1-b2) times larger. `mu_dtype` stores both momenta (float32 by default;
    bfloat16 with stochastic rounding, `_frontier.store_moments`); the statistics, roots
    and graft statistics stay float32."""
    check_learning_rate(learning_rate)
    mu_dtype = check_mu_dtype("shampoo", mu_dtype)
    check_unit_interval("shampoo", b1=b1)
    check_unit_interval("shampoo", closed=True, b2=b2)
    check_nonnegative("shampoo", weight_decay=weight_decay, matrix_eps=matrix_eps,
                      diagonal_eps=diagonal_eps)
    if graft not in GRAFTS:
        raise JaxtrainError(f"shampoo: graft must be one of {', '.join(GRAFTS)}, got {graft!r}")
    for name, value in (("block_size", block_size), ("precondition_every", precondition_every),
                        ("max_preconditioner_dim", max_preconditioner_dim),
                        ("num_devices", num_devices)):
        if not isinstance(value, int) or value < 1:
            raise JaxtrainError(f"shampoo: {name} must be an integer >= 1, got {value!r}")
    tx = inject(
        _shampoo,
        static=("mask", "block_size", "graft", "precondition_every",
                "start_preconditioning_step", "nesterov", "moving_average_for_momentum",
                "merge_dims", "max_preconditioner_dim", "exponent_override", "mu_dtype",
                "num_devices",
                "matrix_eps", "diagonal_eps"),
        learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask,
        block_size=block_size, graft=graft, precondition_every=precondition_every,
        start_preconditioning_step=start_preconditioning_step, matrix_eps=matrix_eps,
        diagonal_eps=diagonal_eps, nesterov=nesterov,
        moving_average_for_momentum=moving_average_for_momentum, merge_dims=merge_dims,
        max_preconditioner_dim=max_preconditioner_dim, exponent_override=exponent_override,
        mu_dtype=mu_dtype, num_devices=num_devices,
    )
    return with_mask_check(tx, mask, "shampoo: mask")
