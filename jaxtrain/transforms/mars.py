"""MARS, the AdamW form (Yuan et al., 2024, "MARS: Unleashing the Power of Variance
Reduction for Training Large Models"; the practical "approx" variant of the authors' code).

On each leaf of 2 or more dimensions (and on all leaves with `optimize_1d=True`):

    c = g + gamma * b1/(1-b1) * (g - g_prev);  c /= max(1, ||c||)      (per leaf)
    m = b1*m + (1-b1)*c;  v = b2*v + (1-b2)*c^2
    theta -= lr * (m_hat / (sqrt(v_hat) + eps) + wd*theta)

where g_prev is the previous step's gradient (zero at the first step). The other leaves
(biases, norms) get AdamW with `adam_b1`, `adam_b2`, `adam_learning_rate` and
`adam_weight_decay`, as in the authors' code. `eps_inside_correction=True` divides by
(sqrt(v) + eps) / sqrt(1 - b2^t) instead (the placement of `pytorch_optimizer.MARS`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._frontier import check_mu_dtype, f32, finish, in_f32, inject, store_moments, zeros_f32
from .validate import (
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    with_mask_check,
)


class ScaleByMarsState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    prev_grad: optax.Updates


def scale_by_mars(b1=0.95, b2=0.99, gamma=0.025, eps=1e-8, eps_inside_correction=False,
                  mu_dtype=None):
    """The MARS-AdamW direction (before the learning rate) on every leaf given."""

    def init(params):
        return ScaleByMarsState(jnp.zeros([], jnp.int32), zeros_f32(params, mu_dtype),
                                zeros_f32(params, mu_dtype), zeros_f32(params, mu_dtype))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - f32(b1) ** t, 1 - f32(b2) ** t

        def leaf(g, m, v, prev):
            g = f32(g)
            c = g + f32(gamma) * (f32(b1) / (1 - f32(b1))) * (g - f32(prev))
            c = c / jnp.maximum(1.0, jnp.linalg.norm(c))
            m = f32(b1) * f32(m) + (1 - f32(b1)) * c
            v = f32(b2) * f32(v) + (1 - f32(b2)) * c * c
            if eps_inside_correction:
                u = (m / bc1) / ((jnp.sqrt(v) + eps) / jnp.sqrt(bc2))
            else:
                u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
            return u, m, v

        out = jax.tree.map(leaf, updates, state.mu, state.nu, state.prev_grad)
        treedef = jax.tree.structure(updates)
        u, m, v = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out), strict=True))
        store = lambda tree: jax.tree.map(lambda x, s: x.astype(s.dtype), tree, state.mu)
        prev = jax.tree.map(lambda g, s: g.astype(s.dtype), updates, state.prev_grad)
        return u, ScaleByMarsState(count, store(m), store(v), prev)

    return optax.GradientTransformation(init, update)


def _mars(learning_rate, b1, b2, gamma, eps, weight_decay, mask, optimize_1d, adam_b1,
          adam_b2, adam_learning_rate, adam_weight_decay, eps_inside_correction, mu_dtype):
    main = finish(scale_by_mars(b1, b2, gamma, eps, eps_inside_correction),
                  learning_rate, weight_decay, mask)
    if optimize_1d:
        return store_moments(main, mu_dtype)
    other = finish(
        in_f32(optax.scale_by_adam(adam_b1, adam_b2, eps, mu_dtype=jnp.float32)),
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_weight_decay,
    )
    labels = lambda params: jax.tree.map(lambda p: "mars" if p.ndim >= 2 else "adam", params)
    return store_moments(optax.partition({"mars": main, "adam": other}, labels), mu_dtype)


def mars(learning_rate, b1: float = 0.95, b2: float = 0.99, gamma: float = 0.025, eps: float = 1e-8,
         weight_decay: float = 0.0, mask=None, optimize_1d: bool = False, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_learning_rate=None, adam_weight_decay: float = 0.0,
         eps_inside_correction: bool = False, mu_dtype=None):
    """MARS-AdamW (see the module docstring). `adam_learning_rate=None` uses
    `learning_rate` for the 1-D leaves; `mask` selects which MARS leaves decay. `mu_dtype`
    stores the moments and the previous gradient (float32 by default; bfloat16 with
    stochastic rounding, `_frontier.store_moments`)."""
    check_learning_rate(learning_rate)
    mu_dtype = check_mu_dtype("mars", mu_dtype)
    if adam_learning_rate is not None:
        check_learning_rate(adam_learning_rate, "mars: adam_learning_rate")
    check_unit_interval("mars", b1=b1, b2=b2, adam_b1=adam_b1, adam_b2=adam_b2)
    check_positive("mars", eps=eps)
    check_nonnegative("mars", gamma=gamma, weight_decay=weight_decay,
                      adam_weight_decay=adam_weight_decay)
    tx = inject(
        _mars, static=("mask", "optimize_1d", "eps_inside_correction", "mu_dtype"),
        learning_rate=learning_rate, b1=b1, b2=b2, gamma=gamma, eps=eps,
        weight_decay=weight_decay, mask=mask, optimize_1d=optimize_1d, adam_b1=adam_b1,
        adam_b2=adam_b2, adam_learning_rate=adam_learning_rate,
        adam_weight_decay=adam_weight_decay, eps_inside_correction=eps_inside_correction,
        mu_dtype=mu_dtype,
    )
    return with_mask_check(tx, mask, "mars: mask")
