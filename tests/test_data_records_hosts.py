"""Two processes x 4 CPU devices (the localhost set-up of tests/_multiprocess.py)
train on prepared records: each reads only its own rows of every global batch, together
they read each global batch exactly once, and their training equals one process with
8 devices."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _multiprocess import base_env, free_port, launch
from records_multihost_worker import BATCH, STEPS, train

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
