"""Second-order optimizers under Optax's extra-args convention.

`update(grad, state, params, value=..., grad=..., value_fn=...)`: the incoming updates
are the gradient, and `value_fn(params) -> scalar loss` is the objective whose curvature
is used. Extra arguments that a method does not need are accepted and ignored, so the
same loop drives `newton`, `newton_cg` and `lbfgs`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ..errors import JaxtrainError
from .validate import check_learning_rate, check_nonnegative, check_positive


class NewtonState(NamedTuple):
    """Number of steps taken."""

    count: jax.Array


def _require_value_fn(name, value_fn):
    if value_fn is None:
        raise JaxtrainError(
            f"{name}: update needs value_fn=<params -> scalar loss> as a keyword argument"
        )


def scale_by_newton(damping: float = 0.0, max_params: int = 4096):
    """The Newton direction (H + damping*I)^-1 g from the exact Hessian of the flattened
    params (an n x n matrix: refused at `init` above `max_params` params)."""

    def init(params):
        n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
        if n > max_params:
            raise JaxtrainError(
                f"newton: the model has {n} params, above max_params={max_params}; the exact "
                f"Hessian would be {n}x{n}. Use newton_cg (Hessian-vector products, any "
                f"size) or raise max_params"
            )
        return NewtonState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _require_value_fn("newton", value_fn)
        flat, unravel = ravel_pytree(params)
        grad, _ = ravel_pytree(updates)
        hessian = jax.hessian(lambda x: value_fn(unravel(x)))(flat)
        hessian = hessian + damping * jnp.eye(flat.size, dtype=hessian.dtype)
        direction = jnp.linalg.solve(hessian, grad)
        return unravel(direction), NewtonState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_newton_cg(damping: float = 0.0, max_cg_steps: int = 50, tol: float = 1e-6):
    """The Newton direction solved by conjugate gradients on Hessian-vector products
    (forward-over-reverse: jvp of grad), so the Hessian is never formed."""

    def init(params):
        del params
        return NewtonState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _require_value_fn("newton_cg", value_fn)
        grad_fn = jax.grad(value_fn)

        def hvp(v):
            hv = jax.jvp(grad_fn, (params,), (v,))[1]
            return jax.tree.map(lambda a, b: a + damping * b, hv, v)

        direction, _ = jax.scipy.sparse.linalg.cg(hvp, updates, tol=tol, maxiter=max_cg_steps)
        return direction, NewtonState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def _newton(learning_rate, damping, max_params):
    return optax.chain(
        scale_by_newton(damping, max_params), optax.scale_by_learning_rate(learning_rate)
    )


def _newton_cg(learning_rate, damping, max_cg_steps, tol):
    return optax.chain(
        scale_by_newton_cg(damping, max_cg_steps, tol), optax.scale_by_learning_rate(learning_rate)
    )


def newton(learning_rate=1.0, damping: float = 0.0, max_params: int = 4096):
    """Damped Newton: theta <- theta - lr * (H + damping*I)^-1 g, exact Hessian. For small
    models only: `init` refuses more than `max_params` params."""
    check_learning_rate(learning_rate)
    check_nonnegative("newton", damping=damping)
    if not (isinstance(max_params, int) and max_params > 0):
        raise JaxtrainError(f"newton: max_params must be a positive int, got {max_params!r}")
    return optax.inject_hyperparams(_newton, static_args=("max_params",))(
        learning_rate=learning_rate, damping=damping, max_params=max_params
    )


def newton_cg(learning_rate=1.0, damping: float = 0.0, max_cg_steps: int = 50, tol: float = 1e-6):
    """Hessian-free Newton: the step solves (H + damping*I) d = g by at most `max_cg_steps`
    CG iterations to relative residual `tol`. Any model size. Needs H + damping*I positive
    definite (raise `damping` on non-convex losses)."""
    check_learning_rate(learning_rate)
    check_nonnegative("newton_cg", damping=damping)
    check_positive("newton_cg", tol=tol)
    if not (isinstance(max_cg_steps, int) and max_cg_steps > 0):
        raise JaxtrainError(f"newton_cg: max_cg_steps must be a positive int, got {max_cg_steps!r}")
    return optax.inject_hyperparams(_newton_cg, static_args=("max_cg_steps",))(
        learning_rate=learning_rate, damping=damping, max_cg_steps=max_cg_steps, tol=tol
    )


def lbfgs(
    learning_rate=None, memory_size: int = 10, scale_init_precond: bool = True, linesearch=None
):
    """L-BFGS with a zoom line search (strong Wolfe), Optax's. `learning_rate=None` lets the
    line search choose the step; drive it with `optax.value_and_grad_from_state`."""
    if learning_rate is not None:
        check_learning_rate(learning_rate)
    if not (isinstance(memory_size, int) and memory_size > 0):
        raise JaxtrainError(f"lbfgs: memory_size must be a positive int, got {memory_size!r}")
    if linesearch is None:
        linesearch = optax.scale_by_zoom_linesearch(
            max_linesearch_steps=20, initial_guess_strategy="one"
        )
    return optax.inject_hyperparams(optax.lbfgs, static_args=("memory_size",))(
        learning_rate=learning_rate,
        memory_size=memory_size,
        scale_init_precond=scale_init_precond,
        linesearch=linesearch,
    )
