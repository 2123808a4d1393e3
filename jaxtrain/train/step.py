"""Pure train and eval steps built from a user's loss function.

`loss_fn(model_or_params, batch, rng) -> (loss, aux)`: it receives what
`TrainState.model` gives (the NNX module, a Linen callable, or the params of an `apply`
function); `aux` is a dict of scalar metrics. The steps are `(state, batch) -> (state,
metrics)` and `(state, batch) -> metrics`, to be compiled by `jaxtrain.sharding` or the
`Trainer`. Options: a mixed-precision policy, microbatch gradient accumulation (a
`lax.scan` inside the step), a non-finite policy, and `make_multi_step` for k optimizer
steps per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from ..transforms import current_hyperparams, find_state
from ..transforms.loss_scale import LossScaleState
from ..transforms.wrappers import EmaState
from .precision import Policy, get_policy
from .state import TrainState

NAN_POLICIES = ("none", "raise", "skip")
F32 = jnp.float32


def has_convolution(fn, *args) -> bool:
    """Whether `fn(*args)` traces to a convolution (looked for in nested jaxprs too)."""

    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns") and walk(sub):
                        return True
        return False

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def default_unroll(unroll, body, *args):
    """`lax.scan`'s unroll for `body(*args)`. Default: rolled, except on CPU for a body with
    a convolution, which XLA:CPU runs 24-40x slower inside a loop
    (benchmarks/conv_vmap.py); without one the rolled loop is the faster there too (the
    digits MLP step: 109 vs 151 us, benchmarks/loop_overhead.py)."""
    if unroll is not None:
        return unroll
    if jax.default_backend() != "cpu":
        return 1
    return True if has_convolution(body, *args) else 1


def _policy(precision) -> Policy:
    return Policy() if precision is None else get_policy(precision)


def _gradients(loss_fn, policy: Policy, state: TrainState, model_state, batch, rng, scale):
    """`(loss, aux, model_state, grads)` of one (micro)batch; grads of `loss * scale`."""

    def objective(params):
        model = state.adapter.bind(policy.cast_to_compute(params), model_state, True)
        loss, aux = loss_fn(model, policy.cast_to_compute(batch), rng)
        loss = jnp.asarray(loss, F32)
        aux = {k: jnp.asarray(v, F32) for k, v in aux.items()}
        return loss * scale, (loss, aux, state.adapter.state_of(model, model_state))

    (_, (loss, aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params
    )
    return loss, aux, model_state, grads


def _slices(batch, microbatches: int):
    """The batch as `microbatches` strided slices (examples i, i+m, ...) on a new leading
    axis: each device's contiguous block of the batch holds its share of every
    microbatch, so no data moves between devices."""
    size = jax.tree.leaves(batch)[0].shape[0]
    return jax.tree.map(
        lambda x: x.reshape(size // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1),
        batch)


def _accumulated(loss_fn, policy, microbatches: int, unroll, state, batch, rng, scale):
    """`_gradients` averaged over `microbatches` equal slices of the batch, one after the
    other in a `lax.scan` (model state threads through them in order)."""
    if microbatches == 1:
        return _gradients(loss_fn, policy, state, state.model_state, batch, rng, scale)
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % microbatches:
        raise JaxtrainError(
            f"batch size {size} is not divisible by microbatches={microbatches}"
        )
    split = _slices(batch, microbatches)

    def one(model_state, micro, i):
        return _gradients(loss_fn, policy, state, model_state, micro, jax.random.fold_in(rng, i),
                          scale)

    first = jax.tree.map(lambda x: x[0], split)
    unroll = default_unroll(unroll, one, state.model_state, first, 0)
    shapes = jax.eval_shape(one, state.model_state, first, 0)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, F32), (shapes[0], shapes[1], shapes[3]))

    def body(carry, xs):
        (loss_sum, aux_sum, grad_sum), model_state = carry
        loss, aux, model_state, grads = one(model_state, *xs)
        sums = jax.tree.map(lambda a, b: a + b.astype(F32), (loss_sum, aux_sum, grad_sum),
                            (loss, aux, grads))
        return (sums, model_state), None

    ((loss, aux, grads), model_state), _ = jax.lax.scan(
        body, (zeros, state.model_state), (split, jnp.arange(microbatches)), unroll=unroll
    )
    mean = lambda t: jax.tree.map(lambda x: x / microbatches, t)
    grads = jax.tree.map(lambda g, p: (g / microbatches).astype(p.dtype), grads, state.params)
    return mean(loss), mean(aux), model_state, grads


def _objective(loss_fn, policy: Policy, microbatches: int, state: TrainState, batch, rng):
    """`params -> mean loss` on this step's batch, with its rng and the model state before
    the step (updates to that state are dropped): what a line search or a second-order
    method evaluates. Over microbatches, the mean of theirs (same slices as the step)."""

    def value(params, batch, i):
        model = state.adapter.bind(policy.cast_to_compute(params), state.model_state, True)
        rng_i = rng if microbatches == 1 else jax.random.fold_in(rng, i)
        return jnp.asarray(loss_fn(model, policy.cast_to_compute(batch), rng_i)[0], F32)

    if microbatches == 1:
        return lambda params: value(params, batch, 0)
    return lambda params: jnp.mean(jax.lax.map(
        lambda xs: value(params, *xs), (_slices(batch, microbatches), jnp.arange(microbatches))))


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _first_bad(flags: list) -> tuple:
    """(any flag set, index of the first one set)."""
    bad = jnp.stack(flags)
    return jnp.any(bad), jnp.argmax(bad).astype(jnp.int32)


def squared_norm(tree) -> jax.Array:
    """Sum of squares of every element, in float32. On CPU over the concatenated leaves:
    XLA:CPU runs one reduction per leaf as its own kernel, and on a small model those
    kernels cost more than the optimizer update (benchmarks/step_metrics_cost.py)."""
    leaves = [x.astype(F32) for x in jax.tree.leaves(tree)]
    if jax.default_backend() == "cpu" and len(leaves) > 1:
        leaves = [jnp.concatenate([x.ravel() for x in leaves])]
    return sum(jnp.sum(jnp.square(x)) for x in leaves)


def all_finite(tree) -> jax.Array:
    """Whether every element of `tree` is finite; on CPU one check over the concatenated
    leaves, as `squared_norm`: per leaf, `raise`'s check of the updated params took the
    digits MLP's compiled step from 59 XLA:CPU kernels to 79, so to 67 (RESULTS.md,
    "Loop overhead against the tree of 2026-11-30")."""
    leaves = jax.tree.leaves(tree)
    if jax.default_backend() == "cpu" and len(leaves) > 1:
        leaves = [jnp.concatenate([x.ravel() for x in leaves])]  # promoted, never narrowed
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def first_nonfinite(loss, grads, squared, params) -> jax.Array:
    """Index of the first non-finite quantity, in the order they are computed: 0 the loss,
    1..n the gradient leaves (`jax.tree.leaves` order), then the gradient norm (its sum
    of squares `squared` overflowing float32 while each gradient is finite; index 2n + 1),
    then n+1..2n the updated params (2n + 2 when all are finite)."""
    grads_bad = [~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)]
    params_bad = [~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
    n = len(grads_bad)
    at = _first_bad([~jnp.isfinite(loss), *grads_bad, ~jnp.isfinite(squared), *params_bad,
                     jnp.ones((), bool)])[1]
    return jnp.where(at == n + 1, 2 * n + 1, jnp.where(at > n + 1, at - 1, at))


def _recorded(state: TrainState, bad, first) -> jax.Array:
    """The state's non-finite record (first bad step, its first bad leaf, bad-step count)
    after this step, whose first bad leaf is `first`."""
    record = state.nonfinite
    fresh = bad & (record[0] < 0)
    return jnp.stack([jnp.where(fresh, state.step, record[0]),
                      jnp.where(fresh, first, record[1]), record[2] + bad.astype(jnp.int32)])


def make_train_step(loss_fn, *, precision=None, microbatches: int = 1, nan_policy="none",
                    unroll=None):
    """value-and-grad of `loss_fn`, the optimizer update, and metrics (loss, aux,
    gradient norm, learning rate).

    `precision`: a `Policy` or its name (default: float32, no casts). `microbatches`: split
    the batch and accumulate gradients (same update as the whole batch, to float
    tolerance). `nan_policy`: `none` (no checks); `skip` (a step with a non-finite loss,
    gradient or new param changes nothing but the step and data position); `raise` (a
    step with a non-finite loss, gradient or new param is recorded; the `Trainer` stops
    when it reads a later log point's metrics, naming it, and writes no checkpoint from it
    on). `raise` costs one flag per step; `skip` selects between the old and new state on
    every step.
    `unroll`: of the microbatch `lax.scan` (default: see `default_unroll`).
    With a `LossScale` in the state, a non-finite gradient skips the step and halves
    the scale whatever the policy. With a `transforms.dynamic_loss_scale` in the
    optimizer instead, the step multiplies the loss by that transform's scale and the
    transform unscales, skips and adapts (nan_policy must then be `none`); metrics add
    `loss_scale` and `skipped_steps`.
    An optimizer that takes extra args (an Optax `GradientTransformationExtraArgs`: a
    chain with `reduce_on_plateau`, `lbfgs`, `newton`, `newton_cg`) receives the step's
    loss as `value=`, the gradient as `grad=` and `value_fn=` (params -> the loss on this
    batch), under Optax's names.
    The state's `nonfinite` records (first bad step, first bad leaf, count); leaf 0 is the
    loss, 1..n the gradients, n+1..2n the new params, in `jax.tree.leaves` order, 2n+1 the
    gradient norm (overflowed while each gradient is finite; `raise` only).

    The step reads in four parts: the gradient (`_unscaled_gradients`: microbatches and
    loss scaling), the update (`_update`), the metrics (`_metrics`) and the non-finite
    policy (`_flag_nonfinite` for `raise`, `_skip_nonfinite` for `skip` and loss scaling).
    """
    policy = _policy(precision)
    check_nan_policy(nan_policy)
    if not isinstance(microbatches, int) or microbatches < 1:
        raise JaxtrainError(f"microbatches must be a positive integer, got {microbatches!r}")
    loss = _Loss(loss_fn, policy, microbatches, unroll)

    def train_step(state: TrainState, batch):
        rng = state.step_rng()
        in_optimizer = _optimizer_loss_scale(state, nan_policy)
        value, aux, model_state, grads = _unscaled_gradients(loss, state, batch, rng,
                                                             in_optimizer)
        squared = squared_norm(grads)
        new_state = _update(loss, state, batch, rng, value, grads, model_state)
        metrics = _metrics(state, new_state, value, aux, squared, in_optimizer)
        return apply_nan_policy(nan_policy, state, new_state, value, grads, squared, metrics)

    return train_step


def check_nan_policy(nan_policy: str) -> str:
    if nan_policy not in NAN_POLICIES:
        raise JaxtrainError(f"unknown nan_policy {nan_policy!r} (valid: {', '.join(NAN_POLICIES)})")
    return nan_policy


def apply_nan_policy(nan_policy: str, state, new_state, value, grads, squared, metrics):
    """The non-finite policy part, `(state, metrics)` after a step from `state` to
    `new_state` whose loss was `value` and gradients `grads` (`squared`: their sum of
    squares): `none` returns `new_state`; `raise` records a non-finite value; `skip`, and
    any policy with a `LossScale`, keeps the old state on one (see `_flag_nonfinite`,
    `_skip_nonfinite`). Shared by every train step (the DP-SGD step too)."""
    if state.loss_scale is None and nan_policy == "none":
        return new_state, metrics
    if state.loss_scale is None and nan_policy == "raise":
        return _flag_nonfinite(state, new_state, value, grads, squared, metrics)
    return _skip_nonfinite(nan_policy, state, new_state, value, grads, metrics)


class _Loss(NamedTuple):
    """How a step takes its gradient: the user's loss, the precision policy, the
    microbatch count and the microbatch scan's unroll."""

    fn: Callable
    policy: Policy
    microbatches: int
    unroll: object


def _optimizer_loss_scale(state: TrainState, nan_policy: str) -> LossScaleState | None:
    """The state of a `transforms.dynamic_loss_scale` in the optimizer, if there is one
    (refused beside a `LossScale`, which would scale the loss twice, and with a non-finite
    policy, which would stop or undo the overflowing steps the transform skips itself)."""
    found = find_state(state.opt_state, LossScaleState)
    if found is not None and state.loss_scale is not None:
        raise JaxtrainError("the optimizer has a dynamic_loss_scale and the state a "
                            "LossScale (precision float16): keep one, the loss would be "
                            "scaled twice")
    if found is not None and nan_policy != "none":
        raise JaxtrainError(f"nan_policy {nan_policy!r} with a dynamic_loss_scale optimizer: "
                            "it skips overflowing steps itself; use nan_policy 'none'")
    return found


def _unscaled_gradients(loss: _Loss, state: TrainState, batch, rng, in_optimizer=None):
    """The gradient part: `(loss, aux, model_state, grads)` over the microbatches; with a
    `LossScale` in the state, the grads of `loss * scale` divided by the scale again; with
    a loss scale `in_optimizer`, the grads of `loss * scale`, which it divides itself."""
    scaler = state.loss_scale
    scale = 1.0 if scaler is None else scaler.scale
    if in_optimizer is not None:
        scale = in_optimizer.scale
    value, aux, model_state, grads = _accumulated(loss.fn, loss.policy, loss.microbatches,
                                                  loss.unroll, state, batch, rng, scale)
    if scaler is not None:
        grads = jax.tree.map(lambda g: (g.astype(F32) / scale).astype(g.dtype), grads)
    return value, aux, model_state, grads


def _update(loss: _Loss, state: TrainState, batch, rng, value, grads, model_state):
    """The update part: the optimizer step, the new model state, the data position. An
    optimizer taking extra args gets the loss (`value`, for reduce_on_plateau), the
    gradient (`grad`) and the objective (`value_fn`, for line searches and second-order
    methods; traced only where a transform calls it)."""
    extra = {}
    if isinstance(state.tx, optax.GradientTransformationExtraArgs):
        extra = {"value": value, "grad": grads,
                 "value_fn": _objective(loss.fn, loss.policy, loss.microbatches, state,
                                        batch, rng)}
    return state.apply_gradients(grads, **extra).replace(
        model_state=model_state, data_position=state.data_position + 1)


def _metrics(state: TrainState, new_state: TrainState, value, aux, squared,
             in_optimizer=None) -> dict:
    """Loss, gradient norm, aux, the learning rate in force (times a plateau's scale) and
    the loss scale this step used (with one `in_optimizer`, whose gradients `squared`
    measures still scaled: the steps it skipped too)."""
    metrics = {"loss": value, "grad_norm": jnp.sqrt(squared), **aux}
    if in_optimizer is not None:
        metrics["grad_norm"] = metrics["grad_norm"] / in_optimizer.scale
        metrics["loss_scale"] = in_optimizer.scale
        metrics["skipped_steps"] = find_state(new_state.opt_state, LossScaleState).skipped
    hyper = current_hyperparams(new_state.opt_state)
    if "learning_rate" in hyper:
        metrics["learning_rate"] = (jnp.asarray(hyper["learning_rate"], F32)
                                    * jnp.asarray(hyper.get("plateau_scale", 1.0), F32))
    if state.loss_scale is not None:
        metrics["loss_scale"] = state.loss_scale.scale
    return metrics


def _flag_nonfinite(state, new_state, value, grads, squared, metrics):
    """`nan_policy='raise'` (no loss scale): record a non-finite loss, gradient (from the
    gradient norm) or updated param (a learning rate finite in float64 may overflow the
    params in float32); the step itself goes ahead. Which leaf is looked for on the first
    bad step only (a cond: no pass otherwise)."""
    bad = ~jnp.isfinite(value) | ~jnp.isfinite(squared) | ~all_finite(new_state.params)
    first = jax.lax.cond(bad & (state.nonfinite[0] < 0),
                         lambda: first_nonfinite(value, grads, squared, new_state.params),
                         lambda: jnp.asarray(-1, jnp.int32))
    record = _recorded(state, bad, first)
    metrics["nonfinite"] = record
    return new_state.replace(nonfinite=record), metrics


def _skip_nonfinite(nan_policy, state, new_state, value, grads, metrics):
    """`nan_policy='skip'`, and any policy with a `LossScale`: a step with a non-finite
    value keeps the old state but for the step, the data position and the loss scale.
    Overflowing loss-scaled gradients are expected: they skip the step without being
    recorded (`_adjust_loss_scale`); a non-finite loss or param is recorded unless the
    policy is `none`."""
    grads_bad = [~jnp.isfinite(jnp.sum(jnp.square(g.astype(F32))))
                 for g in jax.tree.leaves(grads)]
    params_bad = [~jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)]
    grads_ok = jnp.ones((), bool)
    if state.loss_scale is not None:
        new_state, grads_ok = _adjust_loss_scale(state, new_state, grads_bad)
        grads_bad = [jnp.zeros((), bool) for _ in grads_bad]
    reported, first = _first_bad([~jnp.isfinite(value), *grads_bad, *params_bad])
    if nan_policy == "none":
        reported = jnp.zeros((), bool)
    record = _recorded(state, reported, first)
    advanced = state.replace(step=state.step + 1, nonfinite=record,
                             data_position=state.data_position + 1,
                             loss_scale=new_state.loss_scale)
    metrics["nonfinite"] = record
    return _where(grads_ok & ~reported, new_state.replace(nonfinite=record), advanced), metrics


def _adjust_loss_scale(state, new_state, grads_bad: list):
    """The loss-scaling part after the update: `(new_state with the next scale, whether
    every gradient was finite)`, by the rule of `transforms.next_loss_scale`."""
    grads_ok = ~_first_bad(grads_bad)[0]
    return new_state.replace(loss_scale=state.loss_scale.adjust(grads_ok)), grads_ok


def scan_keep_last(step, state, xs=None, length: int | None = None, unroll=None):
    """`lax.scan` of `step(state, x) -> (state, metrics)` that returns the final state and
    only the last step's metrics. Where the scan is unrolled the earlier steps' metric
    work (the gradient norm, ...) is dead code that XLA drops; in a rolled loop it costs
    less than running the last step outside the loop (measured on CPU)."""
    first = None if xs is None else jax.tree.map(lambda x: x[0], xs)
    shapes = jax.eval_shape(step, state, first)[1]
    empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, x):
        return step(carry[0], x), None

    (state, metrics), _ = jax.lax.scan(body, (state, empty), xs, length=length,
                                       unroll=default_unroll(unroll, step, state, first))
    return state, metrics


def make_multi_step(train_step, steps_per_call: int, unroll=None, metrics: str = "all"):
    """`(state, batches) -> (state, metrics)`: `steps_per_call` optimizer steps in one
    `lax.scan` over batches stacked on a new leading axis. `metrics='all'`: every step's,
    stacked on that axis; `'last'`: the last step's only (cheaper: see `scan_keep_last`).
    `unroll`: as `lax.scan` (default: see `default_unroll`)."""
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise JaxtrainError(f"steps_per_call must be a positive integer, got {steps_per_call!r}")
    if metrics not in ("all", "last"):
        raise JaxtrainError(f"metrics must be 'all' or 'last', got {metrics!r}")

    def multi_step(state, batches):
        if metrics == "last":
            return scan_keep_last(train_step, state, batches, unroll=unroll)
        first = jax.tree.map(lambda x: x[0], batches)
        return jax.lax.scan(train_step, state, batches,
                            unroll=default_unroll(unroll, train_step, state, first))

    return multi_step


def make_eval_step(metric_fn, *, precision=None, use_ema: bool = False):
    """`metric_fn(model, batch) -> dict of per-example values` (leading axis the batch);
    the step returns their masked sums and the example count, so partial batches average
    correctly (`jaxtrain.train.metrics.summarize_eval` turns them into the reported values). With
    `use_ema` the moving average is evaluated where there is one (see `evaluated_params`)."""
    policy = _policy(precision)

    def eval_step(state: TrainState, batch):
        params = evaluated_params(state) if use_ema else state.params
        model = state.model(policy.cast_to_compute(params), train=False)
        values = metric_fn(model, policy.cast_to_compute(batch))
        mask = batch.get("mask", jnp.ones(next(iter(values.values())).shape[0]))
        # a value may have trailing dims (a metric set's confusion entries): sum over examples
        sums = {k: jnp.einsum("b,b...->...", mask, jnp.asarray(v, F32))
                for k, v in values.items()}
        sums["count"] = jnp.sum(mask)
        return sums

    return eval_step


def evaluated_params(state: TrainState):
    """The params an EMA evaluation uses: the state's `ema_params` (`ema_decay`), else the
    average of an `ema` transform in the optimizer (`optimizer.ema`; the same rule), else
    the params themselves."""
    if state.ema_params is not None:
        return state.ema_params
    found = find_state(state.opt_state, EmaState)
    return state.params if found is None else found.ema


def classification_loss(model, batch, rng):
    """Softmax cross-entropy on integer labels, with accuracy as aux."""
    del rng
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}


def classification_metrics(model, batch):
    """Per-example loss and correctness of a classifier."""
    logits = model(batch["image"])
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
        "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
    }
