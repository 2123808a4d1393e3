"""Two processes x 4 CPU devices (the localhost set-up of tests/_multiprocess.py)
train on prepared records: each reads only its own rows of every global batch, together
they read each global batch exactly once, and their training equals one process with
8 devices; their checkpoint at step 3 resumes in one process, which reads the same
global batches from there on, bit for bit, and ends where both uninterrupted runs end (to
the tolerance of one process against two: the reduction order differs)."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _multiprocess import base_env, free_port, launch
from records_multihost_worker import BATCH, STEPS, train

from jaxtrain.checkpoint import Manager
from jaxtrain.data.prepare import prepare_images

pytestmark = pytest.mark.slow  # one 2-process launch: about a minute on 2 cores

WORKER = Path(__file__).with_name("records_multihost_worker.py")


def _launch(records: Path, out: Path):
    port, env = str(free_port()), base_env(4)
    return launch([([sys.executable, str(WORKER), str(i), port, str(records), str(out)], env)
                   for i in range(2)], timeout=480)


def test_two_processes_read_disjoint_rows_and_train_like_one(devices, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from digit_folders import write_digit_folders

    write_digit_folders(tmp_path / "pngs")
    prepare_images(tmp_path / "pngs", tmp_path / "records", progress=False)
    results = _launch(tmp_path / "records", tmp_path)
    for i, (code, _, text) in enumerate(results):
        assert code == 0, f"worker {i} exited {code}:\n{text[-3000:]}"
    state, losses, data = train(str(tmp_path / "records"))
    one = data["train"].loader(BATCH, 0, process_index=0, process_count=1)
    hosts = [np.load(tmp_path / f"rows-{i}.npz") for i in range(2)]
    for s in range(STEPS):
        parts = [h[f"arr_{s}"] for h in hosts]
        assert all(len(p) == BATCH // 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), one(s)["image"])
    np.testing.assert_allclose(json.loads((tmp_path / "losses.json").read_text()), losses,
                               rtol=1e-6)
    got = np.load(tmp_path / "params.npz")
    for kp, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)):
        np.testing.assert_allclose(got[jax.tree_util.keystr(kp)], x, rtol=1e-6, atol=1e-6)
    # the two processes' step-3 checkpoint resumed in one process with 8 devices
    with Manager(tmp_path / "checkpoints") as mngr:
        assert mngr.steps() == [3, STEPS]
        mngr.delete(STEPS)
    recorded = Recorded(data["train"])
    resumed, _, _ = train(str(tmp_path / "records"), checkpoints=str(tmp_path / "checkpoints"),
                          data=recorded)
    assert min(recorded.seen) == 3
    for s in range(3, STEPS):  # the global batches the two processes read, bit for bit
        np.testing.assert_array_equal(recorded.seen[s]["image"],
                                      np.concatenate([h[f"arr_{s}"] for h in hosts]))
    assert int(resumed.step) == int(resumed.data_position) == STEPS
    # the numbers: as close as one process is to two (the reduction order differs: the
    # sums of 2 x 4 devices and of 8 differed in the last bit of one bias here)
    straight = jax.device_get(state.params)
    for kp, x in jax.tree_util.tree_leaves_with_path(jax.device_get(resumed.params)):
        np.testing.assert_allclose(x, got[jax.tree_util.keystr(kp)], rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(straight),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


class Recorded:
    """Prepared records whose loader keeps each batch it gives, by data position."""

    def __init__(self, records):
        self.records, self.identity, self.seen = records, records.identity, {}

    def loader(self, batch_size, seed):
        inner = self.records.loader(batch_size, seed)

        def read(position):
            self.seen[position] = inner(position)
            return self.seen[position]

        return read
