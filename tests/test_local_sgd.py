"""Local SGD / DiLoCo on 8 simulated devices against single-device reference
computations, and its all-reduce traffic against plain data parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import sharding
from jaxtrain.errors import JaxtrainError
from jaxtrain.strategies import (
    LocalSGDState,
    all_reduce_stats,
    local_sgd_shardings,
    make_local_sgd_round,
)
from jaxtrain.train import TrainState, make_train_step

REPLICAS, LOCAL_BATCH, FEATURES, CLASSES = 8, 4, 6, 3


def _apply(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]


def _loss(params, batch, rng):
    del rng
    logits = _apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}


_grad = jax.jit(jax.grad(lambda q, b: _loss(q, b, None)[0]))


def _params():
    rng = np.random.default_rng(0)
    return {"w1": jnp.asarray(rng.normal(size=(FEATURES, 5)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(5, CLASSES)), jnp.float32),
            "b": jnp.zeros(CLASSES)}


def _batches(rounds, steps, seed=1):
    rng = np.random.default_rng(seed)
    n = REPLICAS * LOCAL_BATCH
    return [{"x": rng.normal(size=(steps, n, FEATURES)).astype(np.float32),
             "y": rng.integers(0, CLASSES, size=(steps, n)).astype(np.int32)}
            for _ in range(rounds)]


def _run_local(inner, outer, steps, rounds, mesh):
    train_state = TrainState.create(_apply, inner, jax.random.PRNGKey(0), params=_params())
    state = LocalSGDState.create(train_state, outer, REPLICAS)
    state = jax.device_put(state, local_sgd_shardings(state, mesh))
    round_fn = make_local_sgd_round(_loss, mesh, steps)
    for batches in _batches(rounds, steps):
        state, losses = round_fn(state, batches)
    assert losses.shape == (REPLICAS, steps)
    return state


def _reference(inner, outer, steps, rounds):
    """One replica at a time on one device: `steps` inner steps on its rows, then the
    outer step on the mean of the deltas."""
    params = _params()
    outer_state = outer.init(params)
    inner_states = [inner.init(params) for _ in range(REPLICAS)]
    for batches in _batches(rounds, steps):
        finals = []
        for r in range(REPLICAS):
            p, s = params, inner_states[r]
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            for t in range(steps):
                batch = {k: v[t, rows] for k, v in batches.items()}
                g = _grad(p, batch)
                u, s = inner.update(g, s, p)
                p = optax.apply_updates(p, u)
            finals.append(p)
            inner_states[r] = s
        mean = jax.tree.map(lambda *xs: sum(xs) / REPLICAS, *finals)
        u, outer_state = outer.update(jax.tree.map(jnp.subtract, params, mean), outer_state,
                                      params)
        params = optax.apply_updates(params, u)
    return params


def test_diloco_matches_the_replica_by_replica_reference(devices):
    mesh = sharding.make_mesh(data=-1)
    inner, outer = optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True)
    state = _run_local(inner, outer, steps=3, rounds=2, mesh=mesh)
    expected = _reference(inner, outer, steps=3, rounds=2)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    local = jax.tree.map(lambda x: x[REPLICAS - 1], state.local_params)
    for got, want in zip(jax.tree.leaves(local), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)  # replicas restart at global


def test_one_inner_sgd_step_with_averaging_is_plain_data_parallel_sgd(devices):
    mesh = sharding.make_mesh(data=-1)
    state = _run_local(optax.sgd(0.3), optax.sgd(1.0), steps=1, rounds=3, mesh=mesh)
    params = _params()
    for batches in _batches(3, 1):
        batch = {k: v[0] for k, v in batches.items()}
        g = _grad(params, batch)
        params = jax.tree.map(lambda p, d: p - 0.3 * d, params, g)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_local_sgd_all_reduces_once_per_round_and_data_parallel_every_step(devices):
    mesh = sharding.make_mesh(data=-1)
    steps = 4
    train_state = TrainState.create(_apply, optax.sgd(0.1), jax.random.PRNGKey(0),
                                    params=_params())
    state = LocalSGDState.create(train_state, optax.sgd(1.0), REPLICAS)
    state = jax.device_put(state, local_sgd_shardings(state, mesh))
    batches = _batches(1, steps)[0]
    ops, nbytes = all_reduce_stats(
        make_local_sgd_round(_loss, mesh, steps).lower(state, batches).compile().as_text())
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(_params()))
    assert ops >= 1 and nbytes == param_bytes  # the deltas, once, and nothing else

    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), train_state)
    dp_step = sharding.compile_step(make_train_step(_loss), mesh, shardings)
    batch = {k: v[0] for k, v in batches.items()}
    dp_ops, dp_bytes = all_reduce_stats(dp_step.lower(train_state, batch).compile().as_text())
    # the gradients, every step (plus at most a few scalar metrics: loss, gradient norm)
    assert dp_ops >= 1 and param_bytes <= dp_bytes <= param_bytes + 4 * 8
    # so a round of `steps` data-parallel steps moves `steps` times what local SGD moves
    # (to within those scalars)
    assert steps * dp_bytes // nbytes == steps


def test_local_sgd_refuses_a_mesh_with_model_axes_and_a_bad_period(devices):
    with pytest.raises(JaxtrainError, match="data axis only"):
        make_local_sgd_round(_loss, sharding.make_mesh(data=4, fsdp=2), 2)
    with pytest.raises(JaxtrainError, match="sync_every"):
        make_local_sgd_round(_loss, sharding.make_mesh(data=-1), 0)
