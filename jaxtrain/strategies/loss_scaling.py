"""A float16 train step for optimizers wrapped in `transforms.dynamic_loss_scale`.

The params are cast to `compute_dtype` inside the differentiated function, so the
forward and backward passes run in float16 while the gradients arrive in the params'
dtype; the loss is multiplied by the scale held in the optimizer state, which the
wrapper divides out again (and skips the step on overflow).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..transforms.loss_scale import loss_scale_state, loss_scale_value


def _cast(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss_scaled_step(loss_fn, compute_dtype=jnp.float16):
    """`(state, batch) -> (state, metrics)`; metrics: loss, loss_scale, skipped steps."""

    def train_step(state, batch):
        step_rng = state.step_rng()
        scale = loss_scale_value(state.opt_state)

        def objective(params):
            model = state.model(_cast(params, compute_dtype))
            loss, aux = loss_fn(model, _cast(batch, compute_dtype), step_rng)
            return loss.astype(jnp.float32) * scale, (loss, aux)

        (_, (loss, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads).replace(
            data_position=state.data_position + 1)
        scaler = loss_scale_state(new_state.opt_state)
        metrics = {"loss": loss.astype(jnp.float32), "loss_scale": scale,
                   "skipped_steps": scaler.skipped,
                   **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}}
        return new_state, metrics

    return train_step
