"""Whole training runs as one pure function, so that many can be vmapped and jitted.

A run is: init params from a seed, set the swept hyperparameters in the optimizer state,
then steps in chunks, each chunk a `lax.scan` over its steps (batches gathered on the
device from precomputed indices, the same order as `jaxtrain.data.batch_at`), evaluating
on held-out data between chunks. The step is the `Trainer`'s (`make_train_step` with the
config's precision and microbatches).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..train import TrainState, make_train_step
from ..train.feeds import Batches
from ..train.precision import LossScale, get_policy
from ..train.step import default_unroll, has_convolution
from ..transforms import current_hyperparams, find_state, set_hyperparams


def injected_names(opt_state) -> set[str]:
    """Bare names of the hyperparameters that can be set in `opt_state`."""
    return {name.split("/")[-1] for name in current_hyperparams(opt_state)}


def batch_indices(n: int, batch_size: int, seed: int, steps: int, start: int = 0) -> np.ndarray:
    """(steps, batch_size) example indices: the batches `Trainer.fit` would draw."""
    batches = Batches({"index": np.arange(n, dtype=np.int32)}, batch_size, seed)
    return np.stack([batches.get(s, 1)["index"] for s in range(start, start + steps)])


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What every run of a sweep shares: model, task, optimizer, batch size, eval period,
    and the step's precision policy (a name, None: float32) and microbatches."""

    model_fn: object  # seed -> nnx.Module
    task: object  # jaxtrain.train.tasks.Task
    tx: object  # optax.GradientTransformation with injected hyperparameters
    batch_size: int
    eval_every: int
    precision: object = None
    microbatches: int = 1


def initial_state(spec: RunSpec, seed: int) -> TrainState:
    """The state a run starts from: the model built with `seed` (float params in the
    precision policy's param dtype), fresh optimizer state, a loss scale where the policy
    needs one; as the `Trainer` prepares it."""
    state = TrainState.create(spec.model_fn(seed), spec.tx, jax.random.PRNGKey(seed))
    policy = get_policy(spec.precision or "float32")
    dtype = jnp.dtype(policy.param_dtype)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    if any(cast(x).dtype != x.dtype for x in jax.tree.leaves(state.params)):
        params = jax.tree.map(cast, state.params)
        state = state.replace(params=params, opt_state=spec.tx.init(params))
    if policy.needs_loss_scale:
        state = state.replace(loss_scale=LossScale.create())
    return state


def evaluation_params(state: TrainState):
    """The params to evaluate: a schedule-free optimizer's averaged sequence, else the
    params themselves."""
    found = find_state(state.opt_state, optax.contrib.ScheduleFreeState)
    if found is not None:
        return optax.contrib.schedule_free_eval_params(found, state.params)
    return state.params


def make_runner(spec: RunSpec):
    """Pure, vmappable pieces of a run.

    `start(state, hyper) -> state` sets the swept hyperparameters in the optimizer state;
    `chunk(state, indices, train) -> (state, losses)` takes one optimizer step per row of
    `indices` (k, batch) on `train[row]`, in a `lax.scan` (unrolled on CPU for a model with
    a convolution: see `jaxtrain.train.step.default_unroll`); `evaluate(state, valid) ->
    metrics` gives held-out means.
    """
    train_step = make_train_step(spec.task.loss_fn, precision=spec.precision,
                                 microbatches=spec.microbatches)

    def start(state: TrainState, hyper: dict) -> TrainState:
        return state.replace(opt_state=set_hyperparams(state.opt_state, **hyper))

    def chunk(state: TrainState, indices, train: dict):
        def one(state, rows):
            state, metrics = train_step(state, {k: v[rows] for k, v in train.items()})
            return state, metrics["loss"]

        return jax.lax.scan(one, state, indices,
                            unroll=default_unroll(None, one, state, indices[0]))

    def evaluate(state: TrainState, valid: dict) -> dict:
        return {k: jnp.mean(v) for k, v in example_metrics(spec, state, valid).items()}

    return start, chunk, evaluate


def example_metrics(spec: RunSpec, state: TrainState, data: dict) -> dict:
    """The task's per-example held-out values of `state`'s model on `data` (metrics with
    other shapes, such as confusion entries, left out)."""
    model = state.model(evaluation_params(state), train=False)
    values = spec.task.metric_fn(model, data)
    return {k: v for k, v in values.items() if v.ndim == 1}


def make_rows_evaluate(spec: RunSpec):
    """`evaluate(state, data, rows, weight) -> metrics`: held-out means over the examples
    `data[rows]` weighted by `weight` (0 for padding), so that held-out sets of different
    sizes (a cross-validation's folds) stack into one vmapped evaluation."""

    def evaluate(state: TrainState, data: dict, rows, weight) -> dict:
        values = example_metrics(spec, state, {k: v[rows] for k, v in data.items()})
        return {k: jnp.sum(v * weight) / jnp.sum(weight) for k, v in values.items()}

    return evaluate


def conv_on_cpu(spec: RunSpec, state: TrainState, train: dict) -> bool:
    """Whether the step has a convolution and runs on CPU, where XLA runs a convolution
    inside a loop ~24x slower than unrolled (`benchmarks/conv_vmap.py`) and an unrolled
    chunk of many steps takes long to compile: there, one step per call is faster."""
    if jax.default_backend() != "cpu":
        return False
    batch = {k: v[:spec.batch_size] for k, v in train.items()}
    return has_convolution(make_train_step(spec.task.loss_fn, precision=spec.precision,
                                           microbatches=spec.microbatches), state, batch)
