"""Grain's global shuffle computed vectorized (`jaxtrain.data.shuffle`) gives exactly
Grain's own order: its C++ `index_shuffle` per index, and `MapDataset.shuffle().repeat()`
across epochs and blocks; the records loader built on it reuses its Grain iterator
across fits and reads the same batches as Grain's per-example pipeline."""

import pickle

import grain
import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import (
    index_shuffle_module as grain_index_shuffle,
)

from jaxtrain.data.prepare import prepare_arrays
from jaxtrain.data.records import READ_AHEAD, load_records
from jaxtrain.data.shuffle import ShuffledOrder, shuffle_in_epoch

# sizes around every regime: tiny, the 16-bit block looked up whole, its quirk at
# 2**16 + 1 (the block misses index 2**16), 18- to 34-bit blocks, a 64-bit block
SIZES = [2, 3, 17, 1347, 65535, 65536, 65537, 65538, 131077, 1_000_003, 2**32 + 5, 2**62 + 3]
SEEDS = [0, 1, 12345, 2**31, 2**32 - 1]


@pytest.mark.parametrize("n", SIZES)
def test_equals_grains_index_shuffle(n):
    rng = np.random.default_rng(n % 2**32)
    index = np.arange(n) if n <= 2000 else rng.integers(0, n, 400)
    for seed in SEEDS:
        want = [grain_index_shuffle.index_shuffle(int(i), max_index=n - 1, seed=seed,
                                                  rounds=4) for i in index]
        np.testing.assert_array_equal(shuffle_in_epoch(index, n, seed), want)


def test_order_equals_grains_shuffled_repeat_across_epochs_and_blocks():
    for n, block, seed in ((37, 2**16, 5), (1000, 64, 2**32 - 2), (70_001, 4096, 9)):
        grains = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
        order = ShuffledOrder(n, seed, block=block)
        for start, stop in ((0, 50), (n - 7, n + 30), (3 * n - 100, 3 * n + 5),
                            (block - 3, block + 3), (0, min(2 * n + 1, 3000))):
            got = order.rows(start, stop)
            np.testing.assert_array_equal(got, [grains[p] for p in range(start, stop)])
        assert len(order.cache) <= ShuffledOrder.KEEP  # bounded whatever the span
        again = pickle.loads(pickle.dumps(order))  # as Grain's worker processes get it
        assert again.cache == {}
        np.testing.assert_array_equal(again.rows(n - 7, n + 30), order.rows(n - 7, n + 30))


def test_the_block_after_the_one_asked_for_is_computed_ahead():
    order = ShuffledOrder(1000, 3, block=64)
    order.rows(0, 10)
    assert set(order.cache) == {(0, 0), (0, 1)}
    order.rows(990, 1000)  # an epoch's last block: the next epoch's first comes next
    assert set(order.cache) == {(0, 15), (1, 0)}
    np.testing.assert_array_equal(order.cache[1, 0].result(), shuffle_in_epoch(
        np.arange(64), 1000, 4))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x=rng.normal(size=(203, 3)).astype(np.float32),
             label=rng.integers(0, 5, 203).astype(np.int32))
    prepare_arrays(root / "d.npz", root / "out", valid_fraction=0.0, progress=False)
    return load_records(str(root / "out"))["train"]


def test_loader_is_reused_across_fits_and_reads_any_position(records):
    loader = records.loader(16, 3, process_index=0, process_count=1)
    first = [loader(s)["x"] for s in range(3)]
    again = records.loader(16, 3, process_index=0, process_count=1)  # the next fit
    assert again is loader
    np.testing.assert_array_equal(again(3)["x"], records.source.take(
        ShuffledOrder(len(records), 3).rows(48, 64))["x"])
    np.testing.assert_array_equal(again(1)["x"], first[1])  # a resume
    assert records.loader(16, 4, process_index=0, process_count=1) is not loader


def test_consecutive_batches_are_read_a_group_at_a_time(records, monkeypatch):
    calls, take = [], type(records.source).take
    monkeypatch.setattr(type(records.source), "take",
                        lambda self, rows: calls.append(len(rows)) or take(self, rows))
    loader = records.loader(16, 5, process_index=0, process_count=1)
    got = np.concatenate([loader(s)["x"] for s in range(17)])
    assert calls == [16] + [16 * READ_AHEAD] * 3  # the first batch sizes the groups
    want = take(records.source, ShuffledOrder(len(records), 5).rows(0, 17 * 16))["x"]
    np.testing.assert_array_equal(got, want)


def test_arrays_are_the_first_examples_of_grains_epoch(records):
    grains = grain.MapDataset.source(records.source).shuffle(seed=11)
    got = records.arrays(50, seed=11)
    for k in ("x", "label"):
        np.testing.assert_array_equal(got[k], np.stack([grains[i][k] for i in range(50)]))
