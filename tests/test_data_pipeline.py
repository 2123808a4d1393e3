"""Input pipelines: determinism by seed and position, per-host slicing, prefetch, resume."""

import numpy as np
import pytest

from jaxtrain.data import Pipeline, batch_at, host_slice
from jaxtrain.errors import JaxtrainError

DATA = {"x": np.arange(96), "y": np.arange(96) * 10}


def test_same_seed_and_step_give_the_same_batch_and_examples_stay_paired():
    a = batch_at(DATA, 16, seed=3, step=11)
    b = batch_at(DATA, 16, seed=3, step=11)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], a["x"] * 10)
    assert not np.array_equal(a["x"], batch_at(DATA, 16, seed=4, step=11)["x"])
    # epochs are reshuffled: step 0 and step 6 (first batch of epoch 1) differ
    assert not np.array_equal(batch_at(DATA, 16, 3, 0)["x"], batch_at(DATA, 16, 3, 6)["x"])


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_hosts_together_cover_each_epoch_exactly_once(hosts):
    for epoch in range(2):
        seen = [
            batch_at(DATA, 16, 0, epoch * 6 + s, process_index=h, process_count=hosts)["x"]
            for s in range(6) for h in range(hosts)
        ]
        assert all(len(part) == 16 // hosts for part in seen)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), DATA["x"])


def test_host_slices_reassemble_the_global_batch():
    whole = batch_at(DATA, 16, 5, 2)
    parts = [batch_at(DATA, 16, 5, 2, process_index=h, process_count=4)["x"] for h in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole["x"])


def test_host_slicing_refuses_uneven_or_out_of_range():
    with pytest.raises(JaxtrainError, match="split evenly over 3"):
        host_slice({"x": np.arange(16)}, 0, 3)
    with pytest.raises(JaxtrainError, match="process_index 2"):
        host_slice({"x": np.arange(16)}, 2, 2)


def test_pipeline_prefetches_the_same_batches_and_resumes_from_a_saved_position():
    pure = [batch_at(DATA, 8, 1, s)["x"] for s in range(30)]
    with_prefetch = Pipeline(DATA, 8, seed=1, prefetch=3, process_index=0, process_count=1)
    got = [next(with_prefetch)["x"] for _ in range(12)]
    saved = with_prefetch.state()
    assert saved == {"position": 12, "seed": 1, "batch_size": 8}
    resumed = Pipeline(DATA, 8, seed=1, prefetch=2, process_index=0, process_count=1)
    resumed.restore(saved)
    got += [next(resumed)["x"] for _ in range(18)]
    for a, b in zip(pure, got, strict=True):
        np.testing.assert_array_equal(a, b)
    # as a loop's batch_fn: any step, in or out of order
    np.testing.assert_array_equal(resumed(3)["x"], pure[3])
    with_prefetch.close()
    resumed.close()


def test_pipeline_refuses_a_state_from_another_run():
    pipe = Pipeline(DATA, 8, seed=1, prefetch=0, process_index=0, process_count=1)
    with pytest.raises(JaxtrainError, match="seed=2"):
        pipe.restore({"position": 4, "seed": 2, "batch_size": 8})
    with pytest.raises(JaxtrainError, match="batch_size 200 exceeds"):
        Pipeline(DATA, 200, process_index=0, process_count=1)
