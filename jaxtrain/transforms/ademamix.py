"""AdEMAMix (Pagliardini et al., 2024): Adam plus a slow EMA of the gradients.

    m1 = b1*m1 + (1-b1)*g;  m2 = b3_t*m2 + (1-b3_t)*g;  nu = b2*nu + (1-b2)*g^2
    theta -= lr * ((m1_hat + alpha_t*m2) / (sqrt(nu_hat) + eps) + wd*theta)

Optax's `optax.contrib.scale_by_ademamix`, written with shared broadcasts
(`elementwise.py`: the same values, a faster compile). What this
module adds: the paper's warm-ups of alpha and b3 (`alpha_warmup_steps`,
`b3_warmup_steps`; alpha_t rises linearly, b3_t follows the paper's log-space schedule,
both evaluated at the 1-based step t as the authors' code does), float32 moments for
bfloat16 params, injected hyperparameters and argument checks.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import elementwise
from ._frontier import check_mu_dtype, f32, finish, in_f32, inject, store_moments
from .validate import (
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    with_mask_check,
)


def alpha_schedule(alpha, warmup_steps: int):
    """alpha_t = min(t * alpha / T, alpha) at the 1-based step t (count + 1)."""
    return lambda count: jnp.minimum((count + 1) * f32(alpha) / warmup_steps, f32(alpha))


def b3_schedule(b1, b3, warmup_steps: int):
    """b3_t = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3) at t = count + 1."""

    def schedule(count):
        frac = jnp.minimum((count + 1) / warmup_steps, 1.0)
        lb1, lb3 = jnp.log(f32(b1)), jnp.log(f32(b3))
        return jnp.minimum(jnp.exp(lb1 * lb3 / ((1 - frac) * lb3 + frac * lb1)), f32(b3))

    return schedule


def _ademamix(learning_rate, b1, b2, b3, alpha, eps, weight_decay, mask, mu_dtype,
              alpha_warmup_steps, b3_warmup_steps):
    if alpha_warmup_steps:
        alpha = alpha_schedule(alpha, alpha_warmup_steps)
    if b3_warmup_steps:
        b3 = b3_schedule(b1, b3, b3_warmup_steps)
    scale = in_f32(elementwise.scale_by_ademamix(b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps,
                                                 mu_dtype=jnp.float32))
    return store_moments(finish(scale, learning_rate, weight_decay, mask), mu_dtype)


def ademamix(learning_rate, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999,
             alpha: float = 5.0, eps: float = 1e-8, weight_decay: float = 0.0, mask=None,
             alpha_warmup_steps: int | None = None, b3_warmup_steps: int | None = None,
             mu_dtype=None):
    """AdEMAMix; with no warm-ups it is `optax.contrib.ademamix` (tested step by step), with
    them the authors' schedules (tested against `pytorch_optimizer.AdEMAMix`'s
    `t_alpha_beta3`). `mu_dtype` stores the three moments (float32 by default; bfloat16
    with stochastic rounding, `_frontier.store_moments`)."""
    check_learning_rate(learning_rate)
    mu_dtype = check_mu_dtype("ademamix", mu_dtype)
    check_unit_interval("ademamix", b1=b1, b2=b2, b3=b3)
    check_positive("ademamix", eps=eps)
    check_nonnegative("ademamix", alpha=alpha, weight_decay=weight_decay)
    tx = inject(
        _ademamix, static=("mask", "mu_dtype", "alpha_warmup_steps", "b3_warmup_steps"),
        learning_rate=learning_rate, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps,
        weight_decay=weight_decay, mask=mask, mu_dtype=mu_dtype,
        alpha_warmup_steps=alpha_warmup_steps, b3_warmup_steps=b3_warmup_steps,
    )
    return with_mask_check(tx, mask, "ademamix: mask")
