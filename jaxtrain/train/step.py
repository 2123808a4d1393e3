"""Pure train and eval steps built from a user's loss function.

`loss_fn(model, batch, rng) -> (loss, aux)` where `model` is the Flax NNX module and
`aux` a dict of scalar metrics. The steps are `(state, batch) -> (state, metrics)` and
`(state, batch) -> metrics`, to be compiled by `jaxtrain.sharding`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..transforms import current_hyperparams
from .state import TrainState


def make_train_step(loss_fn):
    """value-and-grad of `loss_fn`, the optimizer update, and metrics (loss, aux,
    gradient norm, learning rate)."""

    def train_step(state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)

        def objective(params):
            model = state.model(params)
            loss, aux = loss_fn(model, batch, step_rng)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (aux, nnx.to_pure_dict(rest))

        (loss, (aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params
        )
        new_state = state.apply_gradients(grads).replace(rng=rng, model_state=model_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        hyper = current_hyperparams(new_state.opt_state)
        if "learning_rate" in hyper:
            metrics["learning_rate"] = jnp.asarray(hyper["learning_rate"])
        return new_state, metrics

    return train_step


def make_eval_step(metric_fn):
    """`metric_fn(model, batch) -> dict of per-example values`; the step returns their
    masked sums and the example count, so partial batches average correctly."""

    def eval_step(state: TrainState, batch):
        model = state.model()
        model.eval()
        values = metric_fn(model, batch)
        mask = batch.get("mask", jnp.ones(next(iter(values.values())).shape[0]))
        sums = {k: jnp.sum(v * mask) for k, v in values.items()}
        sums["count"] = jnp.sum(mask)
        return sums

    return eval_step


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
