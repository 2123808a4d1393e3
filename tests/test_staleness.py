"""stale_gradients: the update at step t is the inner transform's update of the gradient
computed at step t - delay; checked against a plain numpy simulation (SGD) and against
torch.optim.Adam fed the delayed gradients by hand, and reached from the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxtrain import JaxtrainError, transforms
from jaxtrain.transforms import spec
from jaxtrain.transforms.staleness import stale_gradients

A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
B = np.array([1.0, -2.0, 0.5])
THETA0 = np.array([1.0, 1.0, -1.0])


def _grad(theta):
    """Gradient of 0.5 theta'A theta - b'theta (numpy, float64)."""
    return A @ theta - B


def _run_jax(tx, steps):
    """Params after each step, the gradient taken at the current params every step."""
    params = {"w": jnp.asarray(THETA0, jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = {"w": jnp.asarray(A, jnp.float32) @ params["w"] - jnp.asarray(B, jnp.float32)}
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(np.asarray(params["w"]))
    return np.stack(out)


def _numpy_sgd(lr, delay, steps):
    theta, history, out = THETA0.copy(), [], []
    for t in range(steps):
        history.append(_grad(theta))
        if t >= delay:
            theta = theta - lr * history[t - delay]
        out.append(theta.copy())
    return np.stack(out)


@pytest.mark.parametrize("delay", [0, 1, 3, 16])
def test_sgd_with_delay_matches_numpy_simulation(delay):
    got = _run_jax(stale_gradients(transforms.sgd(0.1), delay), 40)
    np.testing.assert_allclose(got, _numpy_sgd(0.1, delay, 40), rtol=1e-5, atol=1e-6)


def test_delay_one_by_hand():
    """theta_1 = theta_0, theta_{t+1} = theta_t - lr * grad(theta_{t-1}), unrolled."""
    lr = 0.1
    t0 = THETA0
    t1 = t0
    t2 = t1 - lr * _grad(t0)
    t3 = t2 - lr * _grad(t1)
    t4 = t3 - lr * _grad(t2)
    got = _run_jax(stale_gradients(transforms.sgd(lr), 1), 4)
    np.testing.assert_allclose(got, np.stack([t1, t2, t3, t4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delay", [1, 4])
def test_adam_with_delay_matches_torch_fed_delayed_gradients(delay):
    """The inner state does not move while no gradient has arrived: Adam's bias
    correction counts from the first applied gradient, as torch's does."""
    p = torch.tensor(THETA0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.05)
    history, expected = [], []
    for t in range(30):
        history.append(_grad(p.detach().numpy().copy()))
        if t >= delay:
            p.grad = torch.tensor(history[t - delay])
            opt.step()
        expected.append(p.detach().numpy().copy())
    got = _run_jax(stale_gradients(optax.adam(0.05), delay), 30)
    # float32 here, float64 there: Adam amplifies the rounding (FACTS: ~1e-5 at lr 0.05)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-4, atol=3e-5)


def test_spec_key_builds_the_wrapper():
    built = spec.build({"optimizer": "sgd", "learning_rate": 0.1, "stale_gradients": 3})
    np.testing.assert_allclose(_run_jax(built, 12), _numpy_sgd(0.1, 3, 12), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_delay_is_refused(bad):
    with pytest.raises(JaxtrainError, match="stale_gradients"):
        spec.build({"optimizer": "sgd", "learning_rate": 0.1, "stale_gradients": bad})


def test_state_is_a_pytree_of_arrays_and_vmaps():
    """Runs under vmap over learning rates (the sweep's pattern): each lane is its own
    delayed run."""
    def run(lr):
        tx = stale_gradients(optax.sgd(lr), 2)
        params = jnp.asarray(THETA0, jnp.float32)
        state = tx.init(params)
        for _ in range(6):
            grads = jnp.asarray(A, jnp.float32) @ params - jnp.asarray(B, jnp.float32)
            updates, state = tx.update(grads, state, params)
            params = params + updates
        return params

    got = jax.vmap(run)(jnp.array([0.1, 0.05]))
    np.testing.assert_allclose(got[0], _numpy_sgd(0.1, 2, 6)[-1], rtol=1e-5)
    np.testing.assert_allclose(got[1], _numpy_sgd(0.05, 2, 6)[-1], rtol=1e-5)
