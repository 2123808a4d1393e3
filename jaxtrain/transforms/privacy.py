"""Differentially private gradient aggregation (DP-SGD, Abadi et al. 2016).

`dp_aggregate` takes per-example gradients (leading batch axis), clips each example's
gradient to global L2 norm `l2_norm_clip`, sums, adds N(0, (l2_norm_clip *
noise_multiplier)^2) noise per coordinate and divides by the batch size. It is Optax's
`differentially_private_aggregate` with one change: the noise key is passed to `update`
as the extra argument `noise_key` (from the TrainState's RNG), not kept in the
optimizer state, so the run's one RNG stream decides all randomness. Under Poisson
subsampling the batch size varies; `expected_batch_size` then fixes the denominator to the
expected (public) size q * N, as Abadi et al. and Opacus do, and padding rows of a
fixed-capacity batch carry zero gradients (they add nothing to the clipped sum).
"""

from __future__ import annotations

import math

import jax
import optax
from optax.contrib import DifferentiallyPrivateAggregateState, differentially_private_aggregate

from ..errors import JaxtrainError
from .optimizers import sgd


def _check(l2_norm_clip, noise_multiplier) -> None:
    if not (isinstance(l2_norm_clip, int | float) and math.isfinite(l2_norm_clip)
            and l2_norm_clip > 0):
        raise JaxtrainError(f"dp: l2_norm_clip must be a finite number > 0, got {l2_norm_clip!r}")
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)
            and noise_multiplier >= 0):
        raise JaxtrainError(
            f"dp: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )


def dp_aggregate(l2_norm_clip: float, noise_multiplier: float,
                 expected_batch_size: float | None = None
                 ) -> optax.GradientTransformationExtraArgs:
    """Clip per-example gradients, sum, add Gaussian noise, average (first in a chain).

    `update(per_example_grads, state, params=None, *, noise_key)`; the output has no
    batch axis. Noise std per coordinate of the sum: `l2_norm_clip * noise_multiplier`.
    The sum is divided by `expected_batch_size` when given, else by the leading size.
    """
    _check(l2_norm_clip, noise_multiplier)
    if expected_batch_size is not None and not (
            isinstance(expected_batch_size, int | float) and expected_batch_size > 0):
        raise JaxtrainError(f"dp: expected_batch_size must be a number > 0, got "
                            f"{expected_batch_size!r}")
    inner = differentially_private_aggregate(l2_norm_clip, noise_multiplier,
                                             key=0)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, noise_key=None, **extra):
        del params, extra
        if noise_key is None:
            raise JaxtrainError("dp_aggregate: update needs the keyword argument noise_key "
                             "(use jaxtrain.strategies.make_dp_train_step)")
        aggregated, _ = inner.update(updates, DifferentiallyPrivateAggregateState(noise_key))
        if expected_batch_size is not None:  # optax divided by the leading size
            size = jax.tree.leaves(updates)[0].shape[0]
            aggregated = jax.tree.map(lambda g: g * (size / expected_batch_size), aggregated)
        return aggregated, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_sgd(learning_rate, l2_norm_clip: float, noise_multiplier: float,
           momentum: float = 0.0, nesterov: bool = False):
    """DP-SGD: `dp_aggregate` then `sgd` (learning rate visible in the state)."""
    return optax.chain(dp_aggregate(l2_norm_clip, noise_multiplier),
                       sgd(learning_rate, momentum=momentum, nesterov=nesterov))
