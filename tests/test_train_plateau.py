"""The train step feeds its loss to reduce_on_plateau: torch's decisions on the same losses."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import transforms
from jaxtrain.train import TrainState, make_train_step
from jaxtrain.transforms import spec


def test_step_passes_its_loss_to_reduce_on_plateau():
    import torch
    losses = jnp.asarray([3.0, 2.0, 2.5, 2.4, 2.6, 1.0, 1.2, 1.1, 1.3, 1.05, 1.4, 0.5])
    tx = spec.build({"optimizer": "sgd", "learning_rate": 0.1,
                     "reduce_on_plateau": {"factor": 0.5, "patience": 1}})
    state = TrainState.create(lambda p, b: None, tx, jax.random.PRNGKey(0),
                              params={"w": jnp.zeros(2)})
    # the loss of step i is losses[i]; its gradient is irrelevant here
    loss_fn = lambda p, batch, rng: (losses[batch["i"][0]] + 0.0 * p["w"].sum(), {})
    step = jax.jit(make_train_step(loss_fn))
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, eps=0)
    scales, expected = [], []
    for i, value in enumerate(np.asarray(losses)):
        state, metrics = step(state, {"i": jnp.asarray([i])})
        sched.step(float(value))
        scales.append(float(transforms.current_hyperparams(state.opt_state)["plateau_scale"]))
        expected.append(opt.param_groups[0]["lr"] / 0.1)
        # the logged rate is the one in force: torch's lr (it left out the plateau's scale)
        np.testing.assert_allclose(float(metrics["learning_rate"]), opt.param_groups[0]["lr"],
                                   rtol=1e-6)
    np.testing.assert_allclose(scales, expected)
    assert min(expected) < 1.0  # the sequence does trigger reductions
