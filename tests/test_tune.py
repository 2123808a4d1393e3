"""Strategy tools: vmapped sweeps equal sequential runs; lr-find; batch size; compare."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtrain import transforms
from jaxtrain.data import batch_at, digits_split
from jaxtrain.errors import JaxtrainError
from jaxtrain.models.registry import build
from jaxtrain.train import make_train_step
from jaxtrain.train.tasks import get_task
from jaxtrain.tune import RunSpec, compare, expand_grid, find_batch_size, lr_find, sweep
from jaxtrain.tune.batch_size import compiled_peak_bytes
from jaxtrain.tune.runs import initial_state


@pytest.fixture(scope="module")
def problem():
    train, valid = digits_split(range(10))
    spec = RunSpec(lambda s: build("cnn", s, num_classes=10, channels=4, features=16),
                   get_task("classification"), transforms.adam(1e-3), 32, 5)
    return spec, train, valid


def _sequential(spec, train, lr, seed, steps):
    """One run the ordinary way: a jitted step, batches from `batch_at`."""
    state = initial_state(spec, seed)
    state = state.replace(opt_state=transforms.set_hyperparams(state.opt_state,
                                                               learning_rate=lr))
    step = jax.jit(make_train_step(spec.task.loss_fn))
    for s in range(steps):
        state, _ = step(state, batch_at(train, spec.batch_size, seed, s))
    return state.params


@pytest.mark.parametrize("n_devices", [1, 8])
def test_sweep_matches_sequential_runs(problem, devices, n_devices):
    spec, train, valid = problem
    grid = {"learning_rate": [1e-3, 1e-2], "seed": [0, 3]}
    result = sweep(spec, grid, train, valid, 10, devices=devices[:n_devices], progress=False,
                   keep_params=True)
    assert result.train_loss.shape == (4, 10) and result.evals["accuracy"].shape == (4, 2)
    for i, point in enumerate(result.points):
        expect = _sequential(spec, train, point["learning_rate"], point["seed"], 10)
        got = jax.tree.map(lambda x, i=i: x[i], result.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                     got, expect)
    assert result.best_index() in range(4)
    assert "<- best" in result.table()


def test_sweep_refuses_bad_grids(problem):
    spec, train, valid = problem
    with pytest.raises(JaxtrainError, match="non-empty list"):
        expand_grid({"learning_rate": []})
    with pytest.raises(JaxtrainError, match="must be > 0"):
        expand_grid({"learning_rate": [0.1, -1.0]})
    with pytest.raises(JaxtrainError, match="finite numbers"):
        expand_grid({"learning_rate": ["fast"]})
    with pytest.raises(JaxtrainError, match="cannot sweep 'momentum'.*valid: .*learning_rate"):
        sweep(spec, {"momentum": [0.9]}, train, valid, 5, progress=False)
    with pytest.raises(JaxtrainError, match="multiple of eval_every"):
        sweep(spec, {"learning_rate": [0.1]}, train, valid, 7, progress=False)


def test_lr_find_suggests_a_rate_below_divergence(problem):
    spec, train, _ = problem
    result = lr_find(spec, train, steps=60, min_lr=1e-5, max_lr=100.0, progress=False)
    assert len(result.losses) < 60  # stopped when the loss blew up
    assert 1e-5 < result.suggestion < result.learning_rates[-1]
    lo = result.smoothed[result.learning_rates <= 1e-4].mean()
    assert result.smoothed[np.argmax(result.learning_rates >= result.suggestion)] < lo


def test_lr_find_refuses_bad_range(problem):
    spec, train, _ = problem
    with pytest.raises(JaxtrainError, match="min_lr < max_lr"):
        lr_find(spec, train, min_lr=1.0, max_lr=0.1)


def test_find_batch_size_is_the_largest_that_fits(problem):
    spec, _, _ = problem
    state = initial_state(spec, 0)
    step = make_train_step(spec.task.loss_fn)
    batch_for = lambda n: {"image": jax.ShapeDtypeStruct((n, 8, 8), np.float32),
                           "label": jax.ShapeDtypeStruct((n,), np.int32)}
    peak_100 = compiled_peak_bytes(step, state, batch_for, 100)
    result = find_batch_size(step, state, batch_for, limit_bytes=peak_100, headroom=1.0,
                             multiple_of=4)
    assert result.batch_size % 4 == 0
    assert result.peak_bytes <= peak_100
    assert compiled_peak_bytes(step, state, batch_for, result.batch_size + 4) > peak_100
    assert 96 <= result.batch_size <= 104
    with pytest.raises(JaxtrainError, match="over the limit"):
        find_batch_size(step, state, batch_for, limit_bytes=1000, headroom=1.0)


def test_compare_tunes_each_strategy(problem, devices):
    spec, train, valid = problem
    result = compare(spec, ["sgd", "adam"], train, valid, 10, seeds=(0, 1),
                     lr_grids={"sgd": [0.1, 0.3], "adam": [1e-3, 1e-2]},
                     devices=devices[:2], progress=False)
    assert [r.name for r in result.results] == ["sgd", "adam"]
    for r in result.results:
        assert r.final.shape == (2,)
        sweep_final = r.sweep.final()
        rows = [p["learning_rate"] == r.learning_rate for p in r.sweep.points]
        np.testing.assert_allclose(r.final, sweep_final[rows])
    assert "steps to target" in result.table()
    with pytest.raises(JaxtrainError, match="did you mean 'adam'"):
        compare(spec, ["adamm"], train, valid, 10)


def test_cli_sweep_bad_grid_is_one_line(tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_cnn.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "jaxtrain.cli", "sweep", config, "--grid", "learning_rate=a,b",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "values must be numbers" in result.stderr
