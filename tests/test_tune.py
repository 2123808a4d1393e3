"""Strategy tools: vmapped sweeps equal sequential runs; lr-find; batch size; compare."""

import dataclasses
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
from jaxtrain.tune.compare import strategy_spec
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
    with pytest.raises(JaxtrainError, match="steps must be a positive integer, got 0"):
        sweep(spec, {"learning_rate": [0.1]}, train, valid, 0, progress=False)


def test_sweep_runs_every_step_it_is_given(problem, devices):
    """7 steps with eval_every=5: evaluations after steps 5 and 7, and the final params are
    those of 7 sequential steps (the old sweep refused, its CLI rounded down to 5)."""
    spec, train, valid = problem
    result = sweep(spec, {"learning_rate": [3e-3]}, train, valid, 7, devices=devices[:1],
                   progress=False, keep_params=True)
    assert result.eval_steps.tolist() == [5, 7] and result.train_loss.shape == (1, 7)
    expect = _sequential(spec, train, 3e-3, 0, 7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=2e-4, atol=2e-5),
                 result.params, expect)


def test_sweep_scans_chunks_of_eval_every_steps(problem, devices):
    """Without a convolution (or off CPU) each compiled call is an eval_every-step scan:
    an MLP sweep of 7 steps makes 2 calls (5 + 2 steps), and equals sequential steps."""
    import dataclasses

    from jaxtrain.tune.runs import conv_on_cpu

    spec, train, valid = problem
    mlp = dataclasses.replace(spec, model_fn=lambda s: build("mlp", s, in_features=64,
                                                             out_features=10, hidden=(16,)))
    assert not conv_on_cpu(mlp, initial_state(mlp, 0), train)
    assert conv_on_cpu(spec, initial_state(spec, 0), train)
    result = sweep(mlp, {"learning_rate": [1e-2]}, train, valid, 7, devices=devices[:1],
                   progress=False, keep_params=True)
    expect = _sequential(mlp, train, 1e-2, 0, 7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=2e-4, atol=2e-5),
                 result.params, expect)


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


def test_find_batch_size_says_when_no_limit_was_found(problem):
    """On CPU every size up to the cap fits: the old CLI printed the cap as 'the largest
    batch that fits'."""
    spec, _, _ = problem
    step = make_train_step(spec.task.loss_fn)
    batch_for = lambda n: {"image": jax.ShapeDtypeStruct((n, 8, 8), np.float32),
                           "label": jax.ShapeDtypeStruct((n,), np.int32)}
    result = find_batch_size(step, initial_state(spec, 0), batch_for, limit_bytes=2**40,
                             max_batch=64)
    assert not result.limited and result.batch_size == 64
    assert result.summary().startswith("no memory limit found up to batch size 64")
    limited = find_batch_size(step, initial_state(spec, 0), batch_for, max_batch=64,
                              limit_bytes=compiled_peak_bytes(step, initial_state(spec, 0),
                                                              batch_for, 16), headroom=1.0)
    assert limited.limited and 16 <= limited.batch_size < 32
    assert limited.summary().startswith(f"largest batch that fits: {limited.batch_size} (")


@pytest.mark.parametrize("peak", [
    lambda b: 10_000 + 300 * b,                      # linear: the usual case
    lambda b: 10_000 + 300 * b + (b // 64) * 5_000,  # steps (buffers padded to tiles)
    lambda b: 10_000 + 3 * b * b,                    # convex
    lambda b: 10_000 + 9_000 * b ** 0.5,             # concave
])
@pytest.mark.parametrize("limit, multiple_of", [(40_000, 1), (40_000, 8), (12_000, 4),
                                                (10**9, 8)])
def test_find_batch_size_equals_a_scan_of_every_size_in_few_compiles(monkeypatch, peak, limit,
                                                                     multiple_of):
    """The search (compiles stood in for by `peak`) finds what trying every size finds."""
    from jaxtrain.tune import batch_size

    monkeypatch.setattr(batch_size, "compiled_peak_bytes", lambda f, s, bf, b, **k: peak(b))
    cap = 4096
    sizes = [b for b in range(multiple_of, cap + 1, multiple_of) if peak(b) <= limit]
    search = lambda: find_batch_size(None, None, None, limit_bytes=limit, headroom=1.0,
                                     max_batch=cap, multiple_of=multiple_of)
    if not sizes:
        with pytest.raises(JaxtrainError, match=f"even batch size {multiple_of} needs"):
            search()
        return
    result = search()
    assert result.batch_size == sizes[-1] and result.limited == (sizes[-1] != cap)
    assert len(result.tried) <= 10, sorted(result.tried)  # doubling + bisecting: up to 22


def _held_out(spec, params, valid, seed):
    """The held-out metrics of `params`, evaluated the ordinary way (not by the sweep)."""
    state = initial_state(spec, seed).replace(params=params)
    values = spec.task.metric_fn(state.model(train=False), valid)
    return {k: float(np.mean(v)) for k, v in values.items()}


def test_compare_tunes_each_strategy(problem, devices):
    """Each strategy's tuned rate is the one whose runs, trained and evaluated one by one
    outside compare, have the best mean final held-out accuracy; its reported finals are
    those runs' values. Any optimizer spec is a strategy."""
    spec, train, valid = problem
    strategies = {"sgd": "sgd", "nsgd": {"optimizer": {"name": "normalized_sgd",
                                                       "beta": 0.01, "eps": 0.1}}}
    grids = {"sgd": [0.1, 0.3], "nsgd": [1e-3, 1e-1]}
    result = compare(spec, strategies, train, valid, 10, seeds=(0, 1), lr_grids=grids,
                     devices=devices[:2], progress=False)
    assert [r.name for r in result.results] == ["sgd", "nsgd"]
    for r in result.results:
        one_spec = dataclasses.replace(spec, tx=transforms.spec.build(
            {**strategy_spec(strategies[r.name]), "learning_rate": grids[r.name][0]}))
        finals = {lr: [_held_out(one_spec, _sequential(one_spec, train, lr, seed, 10), valid,
                                 seed)["accuracy"] for seed in (0, 1)] for lr in grids[r.name]}
        assert result.monitor == "accuracy" and result.mode == "max"
        assert r.learning_rate == max(finals, key=lambda lr: np.mean(finals[lr])), r.name
        np.testing.assert_allclose(r.final, finals[r.learning_rate], rtol=1e-3, atol=1e-4)
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


def _tune_cli(*args):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_cnn.yaml")
    return subprocess.run([sys.executable, "-m", "jaxtrain.cli", args[0], config, *args[1:]],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("command", ["sweep", "compare", "lr-find"])
def test_cli_steps_and_a_conflicting_override_are_refused_in_one_line(command, tmp_path):
    result = _tune_cli(command, "--steps", "20", "train.steps=150", "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--steps 20 conflicts with the override train.steps=150" in result.stderr


def test_cli_steps_default_is_the_configs(tmp_path):
    """`train.steps=150` was silently rounded down to the eval period (100) by the sweep."""
    import argparse

    from jaxtrain.cli_tune import _config

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_cnn.yaml")
    args = lambda steps, *overrides: argparse.Namespace(config=config, steps=steps,
                                                        overrides=list(overrides))
    assert _config(args(None)).train.steps == 600  # the file's
    assert _config(args(None, "train.steps=150")).train.steps == 150
    assert _config(args(150, "train.steps=150")).train.steps == 150
    assert _config(args(40)).train.steps == 40


def test_cli_refuses_a_model_split_over_devices(tmp_path):
    result = _tune_cli("lr-find", "sharding.mesh.fsdp=2", "--out", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "lr-find runs each training run on one device" in result.stderr
    assert "sharding.mesh.fsdp=2" in result.stderr


def test_tuning_runs_use_the_configs_precision_and_microbatches():
    from jaxtrain.train.config import load_config
    from jaxtrain.tune.setup import problem_from_config

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_cnn.yaml")
    cfg = load_config(config, ["train.precision=bfloat16_params", "train.microbatches=2",
                               "model.channels=4", "model.features=8"])
    spec = problem_from_config(cfg).spec
    assert spec.microbatches == 2 and spec.precision.param_dtype == jax.numpy.bfloat16
    state = initial_state(spec, 0)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jax.numpy.dtype("bfloat16")}


def test_compare_accepts_any_optimizer_spec():
    from jaxtrain.cli_tune import parse_strategies

    got = parse_strategies("adam,normalized_sgd",
                           ["nsgd={optimizer: {name: normalized_sgd, beta: 0.01, eps: 0.1}}"])
    assert got == {"adam": "adam", "normalized_sgd": "normalized_sgd",
                   "nsgd": {"optimizer": {"name": "normalized_sgd", "beta": 0.01, "eps": 0.1}}}
    assert strategy_spec("normalized_sgd") == {"optimizer": "normalized_sgd"}
    assert strategy_spec(got["nsgd"]) == got["nsgd"]
    with pytest.raises(JaxtrainError, match="valid: a preset .*any optimizer of jaxtrain"):
        strategy_spec("nope")
