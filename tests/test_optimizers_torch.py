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
    "radam": (T.radam(0.01, eps_of="raw"), lambda p: optim.RAdam(p, lr=0.01)),
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


def _float64_gap(ours, make):
    """Max relative gap of our float64 trajectory from torch's, both in float64."""
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in _init().items()}
        grads = {k: np.asarray(v, np.float64) for k, v in _grads().items()}

        def step(carry, g):
            p, state = carry
            updates, state = ours.update(g, state, p)
            p = optax.apply_updates(p, updates)
            return (p, state), p

        _, traj = jax.jit(lambda p, gs: jax.lax.scan(step, (p, ours.init(p)), gs))(params, grads)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(traj))
    tparams = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for k, v in _init().items()}
    opt = make(list(tparams.values()))
    theirs = {k: [] for k in tparams}
    for t in range(STEPS):
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k][t])
        opt.step()
        for k, p in tparams.items():
            theirs[k].append(p.detach().numpy().copy())
    return _max_rel_err(jax.tree.map(np.asarray, traj), {k: np.stack(v) for k, v in theirs.items()})


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_radam_raw_form_is_torch_radam_in_float64(eps):
    """`eps_of='raw'` is torch.optim.RAdam to float64 rounding; Optax's form (the default)
    is not, by more at a larger eps."""
    torch_radam = lambda p: optim.RAdam(p, lr=0.01, eps=eps)  # noqa: E731
    assert _float64_gap(T.radam(0.01, eps=eps, eps_of="raw"), torch_radam) < 1e-13
    assert _float64_gap(T.radam(0.01, eps=eps), torch_radam) > (1e-10 if eps < 1e-6 else 1e-5)
