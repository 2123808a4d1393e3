"""Every optimizer torch.optim also has follows torch step for step (100 steps, same
gradients and init, leaves of several shapes) to 1e-5 relative."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxtrain import transforms as T

STEPS = 100
SHAPES = {"w": (4, 3), "b": (3,), "k": (2, 3, 2)}


def _init():
    rng = np.random.default_rng(1)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grads():
    """Gradients whose scale shrinks then grows, so that running maxima (AMSGrad, Adamax)
    and rectification (RAdam) all take both branches."""
    rng = np.random.default_rng(2)
    scale = 2.0 + np.cos(np.arange(STEPS) / 9.0) * 1.5
    return {
        k: (rng.normal(size=(STEPS, *s)) * scale.reshape(-1, *([1] * len(s)))).astype(np.float32)
        for k, s in SHAPES.items()
    }


def _ours(tx):
    """Our trajectory: params after each of the STEPS updates, stacked."""

    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    params = jax.tree.map(jnp.asarray, _init())
    _, traj = jax.jit(lambda p, gs: jax.lax.scan(step, (p, tx.init(p)), gs))(params, _grads())
    return jax.tree.map(np.asarray, traj)


def _torch(make):
    params = {k: torch.tensor(v, requires_grad=True) for k, v in _init().items()}
    opt = make(list(params.values()))
    grads = _grads()
    traj = {k: [] for k in params}
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = torch.tensor(grads[k][t])
        opt.step()
        for k, p in params.items():
            traj[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in traj.items()}


def _max_rel_err(ours, theirs):
    return max(
        float(np.max(np.abs(ours[k] - theirs[k])) / np.max(np.abs(theirs[k]))) for k in SHAPES
    )


optim = torch.optim
CASES = {
    "sgd": (T.sgd(0.05), lambda p: optim.SGD(p, lr=0.05)),
    "sgd_momentum": (T.sgd(0.05, momentum=0.9), lambda p: optim.SGD(p, lr=0.05, momentum=0.9)),
    "sgd_nesterov": (
        T.sgd(0.05, momentum=0.9, nesterov=True),
        lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    ),
    "adagrad": (
        T.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False),
        lambda p: optim.Adagrad(p, lr=0.05),
    ),
    "adagrad_init": (
        T.adagrad(0.05, initial_accumulator_value=0.1, eps=1e-6, eps_in_sqrt=False),
        lambda p: optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1, eps=1e-6),
    ),
    "adadelta": (T.adadelta(1.0, rho=0.9, eps=1e-6), lambda p: optim.Adadelta(p, lr=1.0)),
    "rmsprop": (
        T.rmsprop(0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        lambda p: optim.RMSprop(p, lr=0.01),
    ),
    "rmsprop_centered": (
        T.rmsprop(0.01, decay=0.99, eps_in_sqrt=False, centered=True),
        lambda p: optim.RMSprop(p, lr=0.01, centered=True),
    ),
    "rmsprop_momentum": (
        T.rmsprop(0.01, decay=0.99, eps_in_sqrt=False, momentum=0.9),
        lambda p: optim.RMSprop(p, lr=0.01, momentum=0.9),
    ),
    "rmsprop_centered_momentum": (
        T.rmsprop(0.01, decay=0.9, eps=0.1, eps_in_sqrt=False, centered=True, momentum=0.5),
        lambda p: optim.RMSprop(p, lr=0.01, alpha=0.9, eps=0.1, centered=True, momentum=0.5),
    ),
    "adam": (T.adam(0.01), lambda p: optim.Adam(p, lr=0.01)),
    "adamw": (T.adamw(0.01, weight_decay=0.1), lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    "adamax": (T.adamax(0.01), lambda p: optim.Adamax(p, lr=0.01)),
    "amsgrad": (T.amsgrad(0.01, max_of="raw"), lambda p: optim.Adam(p, lr=0.01, amsgrad=True)),
    "radam": (T.radam(0.01), lambda p: optim.RAdam(p, lr=0.01)),
    "nadam": (T.nadam(0.01, momentum_decay=4e-3), lambda p: optim.NAdam(p, lr=0.01)),
    "nadamw": (
        T.nadamw(0.01, weight_decay=0.1, momentum_decay=4e-3),
        lambda p: optim.NAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_follows_torch_step_for_step(name):
    ours, make = CASES[name]
    err = _max_rel_err(_ours(ours), _torch(make))
    assert err < 1e-5, f"{name}: max relative deviation from torch.optim {err:.2e}"


# The arguments that select torch's formula matter: Optax's defaults measurably differ.
DIFFERS = {
    "amsgrad": (T.amsgrad(0.01), lambda p: optim.Adam(p, lr=0.01, amsgrad=True)),
    "nadam": (T.nadam(0.01), lambda p: optim.NAdam(p, lr=0.01)),
    "rmsprop": (T.rmsprop(0.01, decay=0.99, eps=0.1), lambda p: optim.RMSprop(p, lr=0.01, eps=0.1)),
}


@pytest.mark.parametrize("name", list(DIFFERS))
def test_optax_default_formula_differs_from_torch(name):
    ours, make = DIFFERS[name]
    assert _max_rel_err(_ours(ours), _torch(make)) > 1e-3
