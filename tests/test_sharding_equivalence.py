"""The same step on 8 simulated devices gives one device's params after 10 steps (1e-5):
dp, fsdp, tp, fsdp+tp through `compile_step`, and the pmap path; digits CNN and a GPT."""

import jax
import numpy as np
import optax
import pytest
from _sharding_models import build, train

PLACEMENTS = {
    "dp": ("dp", dict(data=8)),
    "fsdp": ("fsdp", dict(data=1, fsdp=8)),
    "tp": ("tp", dict(data=1, tensor=8)),
    "fsdp+tp": ("fsdp+tp", dict(data=2, fsdp=2, tensor=2)),
    "pmap": ("pmap", None),
}
_baselines: dict = {}


def _baseline(kind, devices):
    if kind not in _baselines:
        state, losses, _ = train(kind, "dp", devices=devices[:1])
        _baselines[kind] = (jax.device_get(state.params), losses)
    return _baselines[kind]


@pytest.mark.parametrize("kind", ["cnn", "gpt"])
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_placement_matches_one_device(devices, kind, name):
    preset, sizes = PLACEMENTS[name]
    params1, losses1 = _baseline(kind, devices)
    state, losses, mesh = train(kind, preset, sizes)
    assert mesh.devices.size == 8
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    flat1 = jax.tree_util.tree_leaves_with_path(params1)
    flat8 = jax.tree.leaves(jax.device_get(state.params))
    for (path, a), b in zip(flat1, flat8, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    if name in ("fsdp", "tp", "fsdp+tp"):  # the params really are split
        sharded = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
        assert sharded, f"{name}: every param is replicated"


def test_pmap_sum_is_devices_times_mean(devices):
    """reduce='sum' sums the 8 devices' gradients: with SGD the first update is 8x the
    mean's (the sum of 8 slice means vs their mean)."""
    tx = optax.sgd(0.1)
    init = jax.device_get(build("cnn", tx)[0].params)
    mean = jax.device_get(train("cnn", "pmap", steps=1, tx=tx)[0].params)
    total = jax.device_get(train("cnn", "pmap-sum", steps=1, tx=tx)[0].params)
    d_mean = jax.tree.map(lambda a, b: b - a, init, mean)
    d_sum = jax.tree.map(lambda a, b: b - a, init, total)
    for a, b in zip(jax.tree.leaves(d_mean), jax.tree.leaves(d_sum), strict=True):
        np.testing.assert_allclose(b, 8 * a, rtol=1e-4, atol=1e-7)


def test_pmap_with_the_train_modules_state_and_step(devices):
    """`jaxtrain.train`'s TrainState and step under pmap_step match one device; the step's
    grad_norm metric sees the summed gradient (the documented caveat: 8x)."""
    from flax import nnx

    from jaxtrain import sharding
    from jaxtrain.models import CNN
    from jaxtrain.train import TrainState, classification_loss, make_train_step

    def run(pmap: bool):
        with nnx.use_eager_sharding(False):
            model = CNN(rngs=nnx.Rngs(0))
        state = TrainState.create(model, optax.adam(1e-3), jax.random.key(0))
        fn = make_train_step(classification_loss)
        if pmap:
            step = sharding.pmap_step(fn)
            mesh = step.mesh
            shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
        else:
            mesh = sharding.make_mesh(devices=devices[:1])
            shardings = sharding.state_shardings(state, mesh, "dp")
            step = sharding.compile_step(fn, mesh, shardings)
        state = sharding.place(state, shardings)
        for i in range(3):
            r = np.random.default_rng(i)
            batch = {"image": r.normal(size=(16, 8, 8)).astype(np.float32),
                     "label": r.integers(0, 10, 16).astype(np.int32)}
            state, metrics = step(state, sharding.shard_batch(batch, mesh))
        return jax.device_get(state.params), jax.device_get(metrics)

    (p8, m8), (p1, m1) = run(True), run(False)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], 8 * m1["grad_norm"], rtol=1e-4)
