"""First-order optimizers as Optax `GradientTransformation`s.

Each is built on Optax where Optax is exact, wrapped in `optax.inject_hyperparams`
so that the learning rate in force is visible in the state (see
`current_hyperparams`). Hyperparameter names follow Optax.
"""

from __future__ import annotations

import math

import optax

from .validate import check_learning_rate, check_unit_interval


def _injected(factory, **hyperparams):
    return optax.inject_hyperparams(factory)(**hyperparams)


def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False):
    """SGD, optionally with heavy-ball or Nesterov momentum (torch.optim.SGD semantics)."""
    check_learning_rate(learning_rate)
    if not (momentum >= 0.0 and math.isfinite(momentum)):
        raise ValueError(f"sgd: momentum must be a finite number >= 0, got {momentum!r}")
    return _injected(
        optax.sgd, learning_rate=learning_rate, momentum=momentum or None, nesterov=nesterov
    )


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam (Kingma & Ba, 2015); the same update as torch.optim.Adam."""
    check_learning_rate(learning_rate)
    check_unit_interval("adam", b1=b1, b2=b2)
    return _injected(optax.adam, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def adamw(
    learning_rate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask=None,
):
    """AdamW (Loshchilov & Hutter): decay decoupled from the gradient and scaled by the
    learning rate, as torch.optim.AdamW (whose default weight_decay, 1e-2, we share)."""
    check_learning_rate(learning_rate)
    check_unit_interval("adamw", b1=b1, b2=b2)
    return _injected(
        optax.adamw,
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=mask,
    )
