"""Whole training runs as one pure function, so that many can be vmapped and jitted.

A run is: init params from a seed, set the swept hyperparameters in the optimizer state,
then `lax.scan` over steps (batches gathered on the device from precomputed indices, the
same order as `jaxtrain.data.batch_at`), evaluating on held-out data every `eval_every`
steps. `run(point) -> curves` where `point` holds scalars (learning rate, weight decay...)
and the curves are the training loss per step and held-out metrics per evaluation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..train import TrainState, make_train_step
from ..train.feeds import Batches
from ..transforms import current_hyperparams, set_hyperparams


def injected_names(opt_state) -> set[str]:
    """Bare names of the hyperparameters that can be set in `opt_state`."""
    return {name.split("/")[-1] for name in current_hyperparams(opt_state)}


def batch_indices(n: int, batch_size: int, seed: int, steps: int, start: int = 0) -> np.ndarray:
    """(steps, batch_size) example indices: the batches `Trainer.fit` would draw."""
    batches = Batches({"index": np.arange(n, dtype=np.int32)}, batch_size, seed)
    return np.stack([batches.get(s, 1)["index"] for s in range(start, start + steps)])


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What every run of a sweep shares: model, task, optimizer, batch size, eval period."""

    model_fn: object  # seed -> nnx.Module
    task: object  # jaxtrain.train.tasks.Task
    tx: object  # optax.GradientTransformation with injected hyperparameters
    batch_size: int
    eval_every: int


def initial_state(spec: RunSpec, seed: int) -> TrainState:
    """The state a run starts from: the model built with `seed`, fresh optimizer state."""
    return TrainState.create(spec.model_fn(seed), spec.tx, jax.random.PRNGKey(seed))


def evaluation_params(state: TrainState):
    """The params to evaluate: a schedule-free optimizer's averaged sequence, else the
    params themselves."""
    is_sf = lambda node: isinstance(node, optax.contrib.ScheduleFreeState)
    found = [n for n in jax.tree.leaves(state.opt_state, is_leaf=is_sf) if is_sf(n)]
    if found:
        return optax.contrib.schedule_free_eval_params(found[0], state.params)
    return state.params


def make_runner(spec: RunSpec):
    """Pure, vmappable pieces of a run.

    `start(state, hyper) -> state` sets the swept hyperparameters in the optimizer state;
    `step(state, indices, train) -> (state, loss)` is one optimizer step on
    `train[indices]`; `evaluate(state, valid) -> metrics` gives held-out means.
    The caller loops over steps on the host: XLA's CPU backend runs convolutions inside a
    `lax.scan`/while loop some 24x slower than unrolled (`benchmarks/conv_vmap.py`).
    """
    train_step = make_train_step(spec.task.loss_fn)

    def start(state: TrainState, hyper: dict) -> TrainState:
        return state.replace(opt_state=set_hyperparams(state.opt_state, **hyper))

    def step(state: TrainState, indices, train: dict):
        state, metrics = train_step(state, {k: v[indices] for k, v in train.items()})
        return state, metrics["loss"]

    def evaluate(state: TrainState, valid: dict) -> dict:
        model = state.model(evaluation_params(state), train=False)
        values = spec.task.metric_fn(model, valid)
        return {k: jnp.mean(v) for k, v in values.items() if v.ndim == 1}  # not confusion

    return start, step, evaluate
