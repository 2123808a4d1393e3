"""`compare` for an optimizer table: the same relative learning-rate grid around each
optimizer's own rate, each strategy's runs saved as they finish and reused (an interrupted
comparison resumes), and the table's median [min, max] over seeds; on a tiny digits MLP."""

import importlib

import numpy as np
import pytest

from jaxtrain import transforms
from jaxtrain.data import digits_split
from jaxtrain.errors import JaxtrainError
from jaxtrain.models.registry import build
from jaxtrain.train.tasks import get_task
from jaxtrain.tune import RunSpec, compare

compare_module = importlib.import_module("jaxtrain.tune.compare")  # the name is the function

STRATEGIES = {"adamw": {"optimizer": "adamw", "learning_rate": 1e-2},
              "soap": {"optimizer": "soap"}}  # soap's factory default: 3e-3 (the authors')
CENTERS = {"adamw": 1e-2, "soap": 3e-3}
SCALES = [0.5, 2.0]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def problem():
    train, valid = digits_split(range(10))
    spec = RunSpec(lambda s: build("mlp", s, in_features=64, hidden=(16,)),
                   get_task("classification"), transforms.adam(1e-3), 16, 2)
    return spec, train, valid


def _compare(problem, devices, tmp_path, steps=6, key="digits mlp"):
    spec, train, valid = problem
    return compare(spec, STRATEGIES, train, valid, steps, seeds=SEEDS, lr_scales=SCALES,
                   devices=devices[:1], progress=False, cache=tmp_path, problem_key=key)


def test_relative_grids_table_and_resume(problem, devices, tmp_path, monkeypatch):
    first = _compare(problem, devices, tmp_path)
    table = first.table()
    for r in first.results:
        rates = sorted({p["learning_rate"] for p in r.sweep.points})
        np.testing.assert_allclose(rates, [CENTERS[r.name] * s for s in SCALES], rtol=1e-12)
        tuned = [p["learning_rate"] == r.learning_rate for p in r.sweep.points]
        curves = r.sweep.evals["accuracy"][tuned]  # (seeds, evaluations)
        final = curves[:, -1]
        line = next(ln for ln in table.splitlines() if ln.startswith(r.name))
        assert (f"{np.median(final):.4f} [{final.min():.4f}, {final.max():.4f}]") in line
        # first evaluation at or above the target, per seed, counted by hand
        hits = [next((s for s, v in zip(r.sweep.eval_steps, c, strict=True)
                      if v >= first.target), np.inf) for c in curves]
        np.testing.assert_array_equal(r.steps_per_seed, hits)
        assert r.steps_to_target == np.median(hits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adamw.npz", "soap.npz"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(compare_module, "sweep", no_training)
    again = _compare(problem, devices, tmp_path)  # every strategy from its saved runs
    assert again.table() == table and again.target == first.target
    for a, b in zip(first.results, again.results, strict=True):
        np.testing.assert_array_equal(a.sweep.evals["accuracy"], b.sweep.evals["accuracy"])
        np.testing.assert_array_equal(a.sweep.train_loss, b.sweep.train_loss)
    for changed in ({"steps": 4}, {"key": "another problem"}):  # other runs: not reused
        with pytest.raises(AssertionError, match="trained again"):
            _compare(problem, devices, tmp_path, **changed)


def test_relative_grid_needs_a_rate_to_scale(problem):
    spec, train, valid = problem
    with pytest.raises(JaxtrainError, match="strategy 'adamw': learning-rate scales need a "
                                            "rate to scale"):
        compare(spec, ["adamw"], train, valid, 2, lr_scales=SCALES, progress=False)
