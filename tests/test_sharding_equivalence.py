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
