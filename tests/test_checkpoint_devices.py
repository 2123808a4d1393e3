"""Restore onto another device count in fresh processes: saved on 8 devices (fsdp), restored
on 1 and saved again, restored on 4 (fsdp) — bit for bit, with the target's shardings."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _multiprocess import xla_flags
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import sharding

CHILD = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxtrain import sharding, transforms
    from jaxtrain.checkpoint import Manager, model_signature
    from jaxtrain.models import CNN
    from jaxtrain.train import TrainState

    source, target = sys.argv[1], sys.argv[2]
    n = len(jax.devices())
    with nnx.use_eager_sharding(False):
        model = CNN(5, channels=8, features=16, rngs=nnx.Rngs(7))
    state = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(7))
    mesh = sharding.make_mesh(data=1, fsdp=n)
    def put(x):
        spec = PartitionSpec("fsdp") if x.ndim and x.shape[0] % n == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))
    like = state.with_saved(jax.tree.map(put, state.saveable()))
    sig = model_signature(model.config, state.params)
    restored = Manager(source, read_only=True).restore(like, sig)
    kernel = restored.params["backbone"]["dense"]["kernel"]
    assert len(kernel.sharding.device_set) == n, kernel.sharding
    with Manager(target) as mngr:
        mngr.save(int(restored.step), restored, sig)
    flat = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(restored.saveable()))}
    np.savez(target + ".npz", **flat)
    print("OK", n)
""")


def _child(script, source, target, devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
    done = subprocess.run([sys.executable, str(script), str(source), str(target)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["OK", str(devices)]


@pytest.mark.slow
def test_saved_on_8_restored_on_1_then_4_in_fresh_processes(tmp_path, devices):
    from flax import nnx

    from jaxtrain import transforms
    from jaxtrain.checkpoint import Manager, model_signature
    from jaxtrain.models import CNN
    from jaxtrain.train import TrainState

    with nnx.use_eager_sharding(False):
        model = CNN(5, channels=8, features=16, rngs=nnx.Rngs(0))
    state = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(0))
    state = state.replace(step=jax.numpy.asarray(11, jax.numpy.int32))
    mesh = sharding.make_mesh(data=1, fsdp=8)

    def put(x):
        spec = PartitionSpec("fsdp") if x.ndim and x.shape[0] % 8 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    on8 = state.with_saved(jax.tree.map(put, state.saveable()))
    with Manager(tmp_path / "on8") as mngr:
        mngr.save(11, on8, model_signature(model.config, state.params))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    _child(script, tmp_path / "on8", tmp_path / "on1", 1)
    _child(script, tmp_path / "on1", tmp_path / "on4", 4)
    want = [np.asarray(x) for x in jax.tree.leaves(on8.saveable())]
    for name in ("on1", "on4"):
        got = np.load(tmp_path / f"{name}.npz")
        assert len(got.files) == len(want)
        for i, w in enumerate(want):
            np.testing.assert_array_equal(got[str(i)], w)
