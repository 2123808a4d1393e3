"""Meshes, batch placement and the compiled data-parallel step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import sharding
from jaxtrain.errors import JaxtrainError


def test_make_mesh_fills_the_rest(devices):
    mesh = sharding.make_mesh(data=-1, fsdp=2)
    assert dict(mesh.shape) == {"pipe": 1, "data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.batch_parallelism(mesh) == 8


def test_make_mesh_on_given_devices(devices):
    mesh = sharding.make_mesh(devices=devices[:1])
    assert mesh.devices.size == 1


@pytest.mark.parametrize("sizes", [dict(data=3), dict(data=2, fsdp=2, tensor=3),
                                   dict(data=-1, fsdp=3)])
def test_make_mesh_refuses_sizes_that_do_not_fit(devices, sizes):
    with pytest.raises(JaxtrainError, match="8 devices"):
        sharding.make_mesh(**sizes)


def test_shard_batch_refuses_indivisible_batch(devices):
    mesh = sharding.make_mesh()
    with pytest.raises(JaxtrainError, match="leading size 12.*8-way"):
        sharding.shard_batch({"x": np.zeros((12, 3))}, mesh)


def test_unknown_preset_and_axis_are_named():
    with pytest.raises(JaxtrainError, match="unknown sharding preset 'zero'"):
        sharding.get_rules("zero")
    with pytest.raises(JaxtrainError, match="'mlp' -> 'model'"):
        sharding.get_rules({"mlp": "model"})


def _step(state, batch):
    params, opt_state = state

    def loss(p):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optax.sgd(0.1).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": value}


def _run(devices, steps=5):
    mesh = sharding.make_mesh(devices=devices)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 1)), jnp.float32), "b": jnp.zeros(1)}
    state = (params, optax.sgd(0.1).init(params))
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = sharding.place(state, shardings)
    step = sharding.compile_step(_step, mesh, shardings)
    for i in range(steps):
        x = np.random.default_rng(i).normal(size=(16, 4)).astype(np.float32)
        state, metrics = step(state, sharding.shard_batch({"x": x, "y": x.sum(1, keepdims=True)},
                                                          mesh))
    return state, metrics


def test_data_parallel_step_matches_one_device(devices):
    (p8, _), m8 = _run(devices)
    (p1, _), m1 = _run(devices[:1])
    assert len(p8["w"].sharding.device_set) == 8
    np.testing.assert_allclose(p8["w"], p1["w"], rtol=1e-6)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
