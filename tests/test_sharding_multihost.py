"""Two processes x 4 CPU devices on localhost through `sharding.initialize` match one
process with 8 devices; only process 0 logs; their checkpoint restores in one process;
both always exit."""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _multiprocess import base_env, free_port, launch
from _sharding_models import train
from multihost_worker import MESH, STEPS

pytestmark = pytest.mark.slow  # three 2-process launches: about a minute on 2 cores

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 240


def _launch(out: Path, *extra: str):
    """Run both workers (the launcher ends the other when one fails); returns each
    process's (exit code, output without gloo's chatter)."""
    port = str(free_port())
    commands = [([sys.executable, str(WORKER), str(i), port, str(out), *extra], base_env(4))
                for i in range(2)]
    return [(code, text) for code, _, text in launch(commands, TIMEOUT)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    return out, _launch(out)


def test_two_processes_match_one_process(devices, two_process_run):
    out, results = two_process_run
    for i, (code, text) in enumerate(results):
        assert code == 0, f"worker {i} exited {code}:\n{text[-3000:]}"
        assert f"worker {i} done" in text
    state, losses, _ = train("cnn", "fsdp", MESH, steps=STEPS)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["process"] for r in log] == [0] * STEPS  # only process 0 wrote
    np.testing.assert_allclose([r["loss"] for r in log], losses, rtol=1e-6)
    got = np.load(out / "params.npz")
    for kp, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)):
        np.testing.assert_allclose(got[jax.tree_util.keystr(kp)], x, rtol=1e-6, atol=1e-6)


def test_checkpoint_of_both_processes_restores_in_one(devices, two_process_run):
    out, results = two_process_run
    assert all(code == 0 for code, _ in results)
    one = jax.sharding.SingleDeviceSharding(devices[0])
    state = train("cnn", "fsdp", MESH, steps=STEPS)[0]
    saved = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), saved)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(out / "ckpt", target)
    assert int(restored["step"]) == STEPS
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(saved)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6)
    assert jax.tree.leaves(restored)[0].sharding == one


def test_both_processes_exit_when_one_fails(tmp_path):
    start = time.monotonic()
    results = _launch(tmp_path, "--fail-at", "2")
    assert time.monotonic() - start < TIMEOUT
    assert "fails on purpose" in results[1][1]
    assert results[1][0] != 0 and results[0][0] != 0  # process 0 did not carry on alone
    assert not (tmp_path / "log.jsonl").exists()


def test_arrays_split_across_processes_are_checksummed_per_region(devices, two_process_run):
    """Each process checksums the regions it holds; both verify a restore, both refuse a
    flipped bit in process 1's array file; one process restoring all of it checks every
    region (the intact copy restores, the damaged one is refused)."""
    from multihost_worker import Arrays

    from jaxtrain.checkpoint import Manager
    from jaxtrain.errors import JaxtrainError

    out, results = two_process_run
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    seen = [json.loads((out / f"checksums-{i}.json").read_text()) for i in range(2)]
    for record in seen:
        assert record["regions"] >= 8 and record["restored_equal"]  # fsdp 4: 4+ per kernel
        assert "damaged (checksum mismatch in state/" in record["damaged"]
        assert record["damaged"].endswith("])")  # a region of a split array
    assert seen[0]["damaged"] == seen[1]["damaged"]  # both agree, whoever found it
    state, _, mesh = train("cnn", "fsdp", {"data": 1, "fsdp": 8}, steps=0)
    like = Arrays({"params": state.params, "opt_state": state.opt_state})
    with Manager(out / "intact", read_only=True) as mngr:
        restored = mngr.restore(like, step=STEPS).arrays
    got = np.load(out / "params.npz")
    for kp, x in jax.tree_util.tree_leaves_with_path(restored["params"]):
        np.testing.assert_array_equal(got[jax.tree_util.keystr(kp)], np.asarray(x))
    with Manager(out / "managed", read_only=True) as mngr:
        with pytest.raises(JaxtrainError, match=r"checksum mismatch in state/.*\]"):
            mngr.restore(like, step=STEPS)
