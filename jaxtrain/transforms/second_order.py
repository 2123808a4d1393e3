"""Second-order optimizers under Optax's extra-args convention.

`update(grad, state, params, value=..., grad=..., value_fn=...)`: the incoming updates
are the gradient, `value` the loss at `params` and `value_fn(params) -> scalar loss` the
objective whose curvature is used (`jaxtrain.train.make_train_step` passes all three).
Extra arguments that a method does not need are accepted and ignored, so the same loop
drives `newton`, `newton_cg` and `lbfgs`.

`newton` and `newton_cg` are made for non-convex losses too (Martens 2010, "Deep learning
via Hessian-free optimization"; Nocedal & Wright ch. 4 and 7):

- Levenberg-Marquardt damping: the direction solves (H + lambda*I) d = g. With
  `adaptive=True` lambda follows the reduction ratio rho = (actual decrease) /
  (decrease predicted by the quadratic model g.s + s.H.s/2) of the full step, before
  the line search shortens it: x3/2 when rho < 1/4 (the model was too optimistic), x2/3
  when rho > 3/4.
- A negative-curvature guard: CG stops at the first direction p with p.(H + lambda*I).p
  <= 0 (Steihaug), keeping what it had (the gradient if nothing); the exact method uses
  |eigenvalues| of H (saddle-free Newton, Dauphin et al. 2014). A direction that is not a
  descent direction, or not finite, is replaced by the gradient.
- A backtracking (Armijo) line search on `value_fn`: the step lr*d is halved until the
  loss decreases enough, at most `MAX_BACKTRACKS` times; a step that never does is
  not taken (the update is zero and lambda grows).

`adaptive=False` is the plain damped step theta - lr*(H + damping*I)^-1 g: no line search,
fixed damping, no guard (for convex problems and for checks against closed forms).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ..errors import JaxtrainError
from .validate import check_learning_rate, check_nonnegative, check_positive

BOOST, DROP = 1.5, 2.0 / 3.0  # Martens' damping factors
LOW_RATIO, HIGH_RATIO = 0.25, 0.75
MIN_DAMPING = 1e-4  # where a zero damping grows from
ARMIJO = 1e-4  # sufficient decrease: f(x - t*s) <= f(x) - ARMIJO * t * g.s
MAX_BACKTRACKS = 8


class NewtonState(NamedTuple):
    """Steps taken; the damping for the next step; the last step's reduction ratio and
    line-search factor (1: full step, 0: step rejected)."""

    count: jax.Array
    damping: jax.Array
    ratio: jax.Array
    step_size: jax.Array


def _require_value_fn(name, value_fn):
    if value_fn is None:
        raise JaxtrainError(
            f"{name}: update needs value_fn=<params -> scalar loss> as a keyword argument "
            "(jaxtrain's train step passes it)"
        )


def _hvp(f, x):
    """v -> H(x) v for the scalar function `f` of a flat vector, linearized once."""
    return jax.linearize(jax.grad(f), x)[1]


def _solve_exact(f, x, g, damping, adaptive):
    """(H + damping*I)^-1 g from the exact Hessian; with `adaptive`, |eigenvalues|."""
    hessian = jax.hessian(f)(x)
    if not adaptive:
        return jnp.linalg.solve(hessian + damping * jnp.eye(x.size, dtype=x.dtype), g)
    w, q = jnp.linalg.eigh(hessian)
    return q @ ((q.T @ g) / (jnp.abs(w) + damping))


def _solve_cg(f, x, g, damping, max_steps, tol, guard):
    """Conjugate gradients on (H + damping*I) d = g from Hessian-vector products, to
    relative residual `tol`; with `guard`, stops at negative curvature (Steihaug)."""
    hvp = _hvp(f, x)
    matvec = lambda v: hvp(v) + damping * v
    stop = (tol * jnp.linalg.norm(g)) ** 2

    def cond(c):
        i, _, _, _, rs, done = c
        return (i < max_steps) & (rs > stop) & ~done

    def body(c):
        i, d, r, p, rs, _ = c
        ap = matvec(p)
        pap = p @ ap
        negative = guard & (pap <= 0)
        alpha = rs / pap
        d_new, r_new = d + alpha * p, r - alpha * ap
        rs_new = r_new @ r_new
        p_new = r_new + (rs_new / rs) * p
        keep = lambda old, new: jnp.where(negative, old, new)
        return (i + 1, keep(d, d_new), keep(r, r_new), keep(p, p_new), keep(rs, rs_new),
                negative)

    zero = jnp.zeros_like(g)
    start = (jnp.zeros([], jnp.int32), zero, g, g, g @ g, jnp.zeros([], bool))
    _, d, _, _, _, _ = jax.lax.while_loop(cond, body, start)
    return d


def _damped_newton(solve, name, learning_rate, damping, adaptive):
    """One transform: direction from `solve(f, x, g, damping)`, then (with `adaptive`) the
    guard, the line search and the damping update of the module docstring. It applies the
    learning rate itself, since the line search must test the step actually taken."""

    def init(params):
        del params
        return NewtonState(jnp.zeros([], jnp.int32), jnp.asarray(damping, jnp.float32),
                           jnp.full([], jnp.nan, jnp.float32), jnp.ones([], jnp.float32))

    def update(updates, state, params=None, *, value=None, value_fn=None, **extra_args):
        del extra_args
        _require_value_fn(name, value_fn)
        x, unravel = ravel_pytree(params)
        g = ravel_pytree(updates)[0].astype(x.dtype)
        f = lambda v: value_fn(unravel(v)).astype(x.dtype)
        lam = state.damping.astype(x.dtype)
        d = solve(f, x, g, lam)
        count = optax.safe_increment(state.count)
        if not adaptive:
            new = NewtonState(count, state.damping, state.ratio, state.step_size)
            return unravel(-learning_rate * d), new

        f0 = f(x) if value is None else jnp.asarray(value, x.dtype)
        slope = g @ d
        descent = (slope > 0) & jnp.all(jnp.isfinite(d))
        d = jnp.where(descent, d, g)
        slope = jnp.where(descent, slope, g @ g)
        curvature = d @ _hvp(f, x)(d)  # d.H.d, undamped: the model's curvature

        def cond(c):
            k, t, fx = c
            enough = jnp.isfinite(fx) & (fx <= f0 - ARMIJO * t * learning_rate * slope)
            return ~enough & (k < MAX_BACKTRACKS)

        def body(c):
            k, t, _ = c
            return k + 1, t / 2, f(x - (t / 2) * learning_rate * d)

        one = jnp.ones([], x.dtype)
        f_full = f(x - learning_rate * d)
        _, t, fx = jax.lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), one, f_full))
        taken = jnp.isfinite(fx) & (fx <= f0 - ARMIJO * t * learning_rate * slope)
        # rho of the full step, before any backtracking (Martens 2010): a step the line
        # search had to shorten says the quadratic model is trusted too far
        predicted = -learning_rate * slope + 0.5 * learning_rate**2 * curvature
        ratio = jnp.where(jnp.isfinite(f_full) & (predicted < 0), (f_full - f0) / predicted,
                          -jnp.inf)
        lam = jnp.where(ratio < LOW_RATIO, jnp.maximum(lam, MIN_DAMPING) * BOOST,
                        jnp.where(ratio > HIGH_RATIO, lam * DROP, lam))
        step = jnp.where(taken, t * learning_rate, 0.0)
        new = NewtonState(count, lam.astype(jnp.float32), ratio.astype(jnp.float32),
                          jnp.where(taken, t, 0.0).astype(jnp.float32))
        return unravel(-step * d), new

    return optax.GradientTransformationExtraArgs(init, update)


def _exact(learning_rate, *, damping, adaptive, max_params):
    tx = _damped_newton(functools.partial(_solve_exact, adaptive=adaptive), "newton",
                        learning_rate, damping, adaptive)

    def init(params):
        n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
        if n > max_params:
            raise JaxtrainError(
                f"newton: the model has {n} params, above max_params={max_params}; the exact "
                f"Hessian would be {n}x{n}. Use newton_cg (Hessian-vector products, any "
                f"size) or raise max_params"
            )
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def _hessian_free(learning_rate, *, damping, adaptive, max_cg_steps, tol):
    solve = lambda f, x, g, lam: _solve_cg(f, x, g, lam, max_cg_steps, tol, adaptive)
    return _damped_newton(solve, "newton_cg", learning_rate, damping, adaptive)


def _check_damping(name, damping, adaptive):
    check_nonnegative(name, damping=damping)
    if not isinstance(adaptive, bool):
        raise JaxtrainError(f"{name}: adaptive must be true or false, got {adaptive!r}")


def newton(learning_rate=1.0, damping: float = 0.0, max_params: int = 4096,
           adaptive: bool = True):
    """Newton with the exact Hessian of the flattened params: theta <- theta - lr *
    (|H| + lambda*I)^-1 g with adaptive damping and a line search (module docstring);
    `adaptive=False`: the plain step with (H + damping*I). For small models only: `init`
    refuses more than `max_params` params."""
    check_learning_rate(learning_rate)
    _check_damping("newton", damping, adaptive)
    if not (isinstance(max_params, int) and max_params > 0):
        raise JaxtrainError(f"newton: max_params must be a positive int, got {max_params!r}")
    factory = functools.partial(_exact, damping=damping, adaptive=adaptive,
                                max_params=max_params)
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def newton_cg(learning_rate=1.0, damping: float = 1.0, max_cg_steps: int = 50,
              tol: float = 1e-6, adaptive: bool = True):
    """Hessian-free Newton: (H + lambda*I) d = g solved by at most `max_cg_steps` CG
    iterations on Hessian-vector products to relative residual `tol`, any model size.
    `damping` is lambda's start; with `adaptive` (default) it follows the reduction
    ratio, CG stops at negative curvature and a line search guards the step (module
    docstring), which is what lets it train non-convex models."""
    check_learning_rate(learning_rate)
    _check_damping("newton_cg", damping, adaptive)
    check_positive("newton_cg", tol=tol)
    if not (isinstance(max_cg_steps, int) and max_cg_steps > 0):
        raise JaxtrainError(f"newton_cg: max_cg_steps must be a positive int, got {max_cg_steps!r}")
    factory = functools.partial(_hessian_free, damping=damping, adaptive=adaptive,
                                max_cg_steps=max_cg_steps, tol=tol)
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def lbfgs(
    learning_rate=None, memory_size: int = 10, scale_init_precond: bool = True, linesearch=None
):
    """L-BFGS with a zoom line search (strong Wolfe), Optax's. `learning_rate=None` lets the
    line search choose the step. Needs `value`, `grad` and `value_fn` as extra args (the
    train step passes them); outside it, drive it with `optax.value_and_grad_from_state`."""
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
