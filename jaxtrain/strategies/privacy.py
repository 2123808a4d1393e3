"""The DP-SGD train step (per-example gradients by `vmap`) and the privacy accountant.

The step hands per-example gradients to the state's optimizer, whose chain must start
with `jaxtrain.transforms.dp_aggregate` (or be `dp_sgd`), with a fresh `noise_key` split
from the TrainState's RNG each step. Model state (BatchNorm statistics...) is not
updated: statistics pooled over a batch would leak past the per-example clipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ..errors import JaxtrainError
from ..transforms import current_hyperparams


def per_example_grads(loss_fn, state, batch, rng):
    """`(losses, aux, grads)`, each with a leading batch axis: `loss_fn` on batches of one."""
    size = jax.tree.leaves(batch)[0].shape[0]

    def objective(params, example, key):
        one = jax.tree.map(lambda x: x[None], example)
        return loss_fn(state.model(params), one, key)

    grad_fn = jax.vmap(jax.value_and_grad(objective, has_aux=True), in_axes=(None, 0, 0))
    (losses, aux), grads = grad_fn(state.params, batch, jax.random.split(rng, size))
    return losses, aux, grads


def make_dp_train_step(loss_fn):
    """A `(state, batch) -> (state, metrics)` step for a state whose `tx` starts with
    `dp_aggregate`; metrics: loss, aux means, mean per-example gradient norm, lr."""

    def train_step(state, batch):
        step_rng, noise_key = jax.random.split(state.step_rng())
        losses, aux, grads = per_example_grads(loss_fn, state, batch, step_rng)
        norms = jax.vmap(optax.tree.norm)(grads)
        new_state = state.apply_gradients(grads, noise_key=noise_key).replace(
            data_position=state.data_position + 1)
        metrics = {"loss": losses.mean(), "per_example_grad_norm": norms.mean(),
                   **{k: jnp.mean(v) for k, v in aux.items()}}
        hyper = current_hyperparams(new_state.opt_state)
        if "learning_rate" in hyper:
            metrics["learning_rate"] = jnp.asarray(hyper["learning_rate"])
        return new_state, metrics

    return train_step


def dp_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
               accountant: str = "rdp") -> float:
    """Epsilon of DP-SGD with Poisson sampling at `sampling_rate` for `steps` steps.

    Google's `dp_accounting`: `accountant='rdp'` (Renyi DP, Mironov 2017; what TF Privacy
    and Opacus report) or `'pld'` (privacy loss distributions; tighter).
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    if not 0.0 < sampling_rate <= 1.0:
        raise JaxtrainError(f"dp_epsilon: sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not 0.0 < delta < 1.0:
        raise JaxtrainError(f"dp_epsilon: delta must be in (0, 1), got {delta!r}")
    if not (isinstance(steps, int) and steps > 0):
        raise JaxtrainError(f"dp_epsilon: steps must be a positive integer, got {steps!r}")
    if not noise_multiplier > 0:
        raise JaxtrainError(f"dp_epsilon: noise_multiplier must be > 0, got {noise_multiplier!r}")
    makers = {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}
    if accountant not in makers:
        raise JaxtrainError(f"dp_epsilon: unknown accountant {accountant!r} (valid: pld, rdp)")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps,
    )
    acc = makers[accountant]()
    acc.compose(event)
    return float(acc.get_epsilon(delta))
