"""Wrappers and clipping that act on the updates of any chain.

Clipping (`clip_by_global_norm`, `clip`, `adaptive_grad_clip`) goes first in a chain;
`freeze` and `ema` go last. `accumulate`, `skip_nonfinite` and `lookahead` wrap a whole
inner transform: `accumulate(4, tx)`, or `accumulate(4)(tx)`. Built on Optax
(`MultiSteps`, `apply_if_finite`, `masked`, `multi_transform`, the clipping rules)
where Optax is exact; `lookahead` and `ema` keep their extra weights in the optimizer
state so that params stay a plain tree (Optax's lookahead wants `LookaheadParams`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from . import masks
from .find import find_state


def _positive(name: str, value, integer: bool = False):
    kind = int if integer else int | float
    if (isinstance(value, bool) or not isinstance(value, kind)
            or not math.isfinite(value) or value <= 0):
        what = "an integer >= 1" if integer else "a finite number > 0"
        raise JaxtrainError(f"{name} must be {what}, got {value!r}")
    return value


def _unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise JaxtrainError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _wrapping(factory, inner):
    """`factory(inner)` now, or a function waiting for `inner` (`accumulate(4)(tx)`)."""
    if inner is None:
        return factory
    if not isinstance(inner, optax.GradientTransformation):
        raise JaxtrainError(f"expected an optax GradientTransformation to wrap, got "
                            f"{type(inner).__name__}")
    return factory(inner)


# -- clipping ---------------------------------------------------------------------------

def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all updates down together so that their global L2 norm is at most
    `max_norm` (torch `clip_grad_norm_`)."""
    return optax.clip_by_global_norm(_positive("clip_by_global_norm: max_norm", max_norm))


def clip(max_delta: float) -> optax.GradientTransformation:
    """Clip every update element to [-max_delta, max_delta] (torch `clip_grad_value_`)."""
    return optax.clip(_positive("clip: max_delta", max_delta))


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Unit-wise clipping of the update to `clipping` times the param norm (Brock et al.
    2021, NFNets); needs the params."""
    return optax.adaptive_grad_clip(_positive("adaptive_grad_clip: clipping", clipping),
                                    _positive("adaptive_grad_clip: eps", eps))


# -- gradient accumulation and non-finite steps -----------------------------------------

def accumulate(k: int, inner: optax.GradientTransformation | None = None):
    """Average the gradients of `k` calls and run `inner` once on the average; the
    other calls return zero updates (`optax.MultiSteps`). With a mean loss this is
    one step on a k-times larger batch. Extra args (`value=` for `reduce_on_plateau`)
    reach `inner` on the k-th call."""
    _positive("accumulate: k", k, integer=True)

    def wrap(tx):
        steps = optax.MultiSteps(tx, every_k_schedule=k)
        # not `gradient_transformation()`: it would drop extra args such as `value=`
        return optax.GradientTransformationExtraArgs(steps.init, steps.update)

    return _wrapping(wrap, inner)


def _too_many(count, limit):
    raise JaxtrainError(f"skip_nonfinite: {int(count)} steps in a row had NaN/Inf "
                        f"gradients (more than max_consecutive={limit}); the run is "
                        "diverging: lower the learning rate or look for bad data")


def skip_nonfinite(max_consecutive: int, inner: optax.GradientTransformation | None = None):
    """Skip steps whose gradients hold a NaN or Inf: zero updates, `inner`'s state
    untouched, counted in the state (`optax.apply_if_finite`). More than
    `max_consecutive` such steps in a row raise (inside `jit`, as a `JaxRuntimeError`
    carrying this module's message, when the step's results are read)."""
    _positive("skip_nonfinite: max_consecutive", max_consecutive, integer=True)

    def wrap(tx):
        guarded = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)

        def update(updates, state, params=None, **extra):
            updates, state = guarded.update(updates, state, params, **extra)
            jax.lax.cond(state.notfinite_count > max_consecutive,
                         lambda c: jax.debug.callback(_too_many, c, max_consecutive),
                         lambda c: None, state.notfinite_count)
            return updates, state

        return optax.GradientTransformationExtraArgs(guarded.init, update)

    return _wrapping(wrap, inner)


# -- extra weights kept in the state ----------------------------------------------------

class EmaState(NamedTuple):
    ema: Any  # the moving average of the params, same tree as the params


def ema(decay: float) -> optax.GradientTransformation:
    """Keep `ema = decay * ema + (1 - decay) * new_params` in the state (starting from
    the initial params); the updates pass unchanged. Put it last in the chain; read the
    average with `ema_params(opt_state)`. torch's `AveragedModel` with
    `get_ema_multi_avg_fn(decay)` gives the same only if `update_parameters` is called
    once before training: its first call copies the params instead of averaging."""
    decay = _unit("ema: decay", decay)

    def init(params):
        return EmaState(ema=jax.tree.map(jnp.array, params))

    def update(updates, state, params=None):
        if params is None:
            raise JaxtrainError("ema needs the params: call update(updates, state, params)")
        new = optax.apply_updates(params, updates)
        avg = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                           state.ema, new)
        return updates, EmaState(ema=avg)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state):
    """The params' moving average kept by an `ema` transform somewhere in `opt_state`."""
    return find_state(opt_state, EmaState, "no ema(...) transform in this optimizer state").ema


class LookaheadState(NamedTuple):
    inner_state: Any
    slow: Any  # the slow weights
    count: jax.Array  # steps taken


def lookahead(inner: optax.GradientTransformation, sync_period: int = 5,
              alpha: float = 0.5) -> optax.GradientTransformation:
    """Lookahead (Zhang et al. 2019): `inner` moves the (fast) params; every
    `sync_period` steps the slow weights move `alpha` of the way to them and the params
    are reset to the slow weights. The same trajectory as `optax.lookahead`, with the
    slow weights in the state instead of in `LookaheadParams`."""
    _positive("lookahead: sync_period", sync_period, integer=True)
    if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
        raise JaxtrainError(f"lookahead: alpha must be in (0, 1], got {alpha!r}")
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return LookaheadState(inner.init(params), jax.tree.map(jnp.array, params),
                              jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        if params is None:
            raise JaxtrainError("lookahead needs the params: call update(updates, state, "
                                "params)")
        fast_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
        count = optax.safe_increment(state.count)
        sync = count % sync_period == 0
        fast = optax.apply_updates(params, fast_updates)
        slow = jax.tree.map(lambda s, f: jnp.where(sync, s + alpha * (f - s), s),
                            state.slow, fast)
        out = jax.tree.map(lambda u, s, p: jnp.where(sync, s - p, u).astype(u.dtype),
                           fast_updates, slow, params)
        return out, LookaheadState(inner_state, slow, count)

    return optax.GradientTransformationExtraArgs(init, update)


# -- freezing and parameter groups ------------------------------------------------------

def freeze(paths: str | Iterable[str]) -> optax.GradientTransformation:
    """Zero the updates of params whose path matches `paths` (globs or `re:` regexes).

    Put it last in a chain so that nothing after it (weight decay, say) moves them.
    """
    return optax.masked(optax.set_to_zero(), masks.include(paths))


def group_labels(patterns: Iterable[str]) -> dict[str, str]:
    """A readable state label for each group pattern: `backbone/*` -> `backbone`."""
    labels: dict[str, str] = {}
    for i, pattern in enumerate(patterns):
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", pattern.removeprefix("re:")).strip("_.")
        if not label or label == "default" or label in labels.values():
            label = f"group_{i}" + (f"_{label}" if label else "")
        labels[pattern] = label
    return labels


def per_group(groups: dict, default: optax.GradientTransformation):
    """One transform per parameter group: `{'backbone/*': tx_a, 'head/*': tx_b}`.

    A param goes to the first group whose pattern (glob or `re:` regex) matches its path,
    else to `default`. The groups' states are kept apart (`optax.multi_transform`) under
    readable labels (`group_labels`; `default` for the rest), which `current_hyperparams`
    uses to name each group's learning rate: `backbone/learning_rate`.
    """
    if not isinstance(groups, dict) or not all(isinstance(p, str) for p in groups):
        raise JaxtrainError(f"per_group takes a dict of path pattern -> transform, got "
                            f"{groups!r}")
    labels = group_labels(groups)
    transforms = {labels[p]: tx for p, tx in groups.items()}
    transforms["default"] = default

    def label(path: str) -> str:
        for pattern, name in labels.items():
            if masks.include(pattern).test(path, None):
                return name
        return "default"

    return optax.multi_transform(
        transforms, lambda params: jax.tree.map(label, masks.param_paths(params))
    )
