"""The parameter server on Ray actors (`jaxtrain.strategies.param_server`), on a local Ray
cluster with one server and 3 worker actors shared by every test (one pool: the actors'
processes start once, ~3 s of CPU each):

- sync mode equals data parallelism: the mean of the workers' gradients, each on its own
  batch, fed to SGD with momentum, checked against plain jax.grad + optax computed here;
- async mode with a staleness bound d: a worker made slow (it sleeps in its loss) would
  see gradients far staler than d; none is applied staler than d, and the observed
  staleness reaches d;
- a worker whose process is killed mid-run (it SIGKILLs itself) is dropped and the run
  finishes, in sync and async mode;
- the digits CNN reaches a stated held-out accuracy with asynchronous updates.
"""

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _multiprocess import base_env

from jaxtrain import transforms
from jaxtrain.data import batch_at, digits_split
from jaxtrain.errors import JaxtrainError
from jaxtrain.models.registry import build
from jaxtrain.strategies import ParamServerPool, train_param_server
from jaxtrain.train import TrainState, classification_loss, classification_metrics

WORKERS, BATCH, NAP = 3, 4, 0.05  # NAP: seconds the slow worker sleeps per gradient
DIE_AT = 4  # the fragile worker dies computing its 4th gradient


def linear_loss(params, batch, rng):
    """Softmax regression on 8 features (a plain `apply` model: the loss gets params)."""
    logits = batch["x"] @ params["w"] + params["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {}


def _nap(slow):
    time.sleep(NAP * float(slow))


def slow_loss(params, batch, rng):
    """`linear_loss`, sleeping NAP seconds first where the batch is marked slow."""
    jax.debug.callback(_nap, batch["slow"][0])
    return linear_loss(params, batch, rng)


_GRADIENTS = [0]  # gradients this process computed with fragile_loss


def _die_later(fragile):
    """SIGKILL this process (a crashing worker) as it computes its DIE_AT-th gradient."""
    _GRADIENTS[0] += int(fragile)
    if _GRADIENTS[0] == DIE_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def fragile_loss(params, batch, rng):
    """`slow_loss` that kills its worker's process where the batch is marked fragile."""
    jax.debug.callback(_die_later, batch["fragile"][0])
    return slow_loss(params, batch, rng)


def _data(n: int = 48, fragile: int | None = None) -> dict:
    """Random features and labels; worker 0's share (examples 0::W) is marked slow, and
    worker `fragile`'s fragile."""
    rng, index = np.random.default_rng(0), np.arange(n) % WORKERS
    return {"x": rng.normal(size=(n, 8)).astype(np.float32),
            "y": rng.integers(0, 3, n).astype(np.int32),
            "slow": (index == 0).astype(np.float32),
            "fragile": (index == fragile).astype(np.float32)}


def _state(tx) -> TrainState:
    params = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(1), (8, 3)),
              "b": jnp.zeros(3)}
    return TrainState.create(linear_loss, tx, jax.random.PRNGKey(0), params=params)


@pytest.fixture(scope="module")
def pool():
    import ray

    child = base_env(1)  # this file's functions unpickle in the actors from tests/
    env = {k: child[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {**env, "OPENBLAS_NUM_THREADS": "1"}})
    try:
        with ParamServerPool(WORKERS) as made:
            yield made
    finally:
        ray.shutdown()


def test_sync_equals_the_data_parallel_mean_gradient_step(pool):
    steps, seed, data = 6, 3, _data()
    got = pool.train(_state(transforms.sgd(0.1, momentum=0.9)), linear_loss, data, steps=steps,
                     batch_size=BATCH, mode="sync", seed=seed, timeout=120)
    # oracle: worker i owns examples i::W and draws its k-th batch with batch_at
    params = jax.device_get(_state(optax.sgd(0)).params)
    tx = optax.sgd(0.1, momentum=0.9)  # not scale-invariant, as Adam nearly is
    opt_state = tx.init(params)
    shares = [{k: v[i::WORKERS] for k, v in data.items()} for i in range(WORKERS)]
    grad = jax.grad(lambda p, b: linear_loss(p, b, None)[0])
    for k in range(steps):
        grads = [grad(params, batch_at(s, BATCH, seed, k)) for s in shares]
        mean = jax.tree.map(lambda *g: sum(g) / WORKERS, *grads)
        updates, opt_state = tx.update(mean, opt_state, params)
        params = optax.apply_updates(params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got.state.params, params)
    assert int(got.state.step) == got.steps == steps
    assert got.staleness == [0] * steps and got.examples == steps * WORKERS * BATCH


def test_async_never_applies_a_gradient_staler_than_the_bound(pool):
    bound, steps = 4, 40
    got = pool.train(_state(transforms.sgd(0.1)), slow_loss, _data(), steps=steps,
                     batch_size=BATCH, mode="async", max_staleness=bound, timeout=120)
    seen = got.staleness_summary()
    # the slow worker's gradients (NAP each, the fast ones' a few ms) are held back to
    # meet their deadline: applied exactly `bound` versions late, never later
    assert len(got.staleness) == steps and seen["max"] == bound, seen
    assert got.examples == steps * BATCH and got.lost == 0 and not got.dropped


@pytest.mark.slow
def test_the_digits_cnn_learns_asynchronously(pool):
    train, valid = digits_split()
    state = TrainState.create(build("cnn", 0), transforms.adam(3e-3), jax.random.PRNGKey(0))
    got = pool.train(state, classification_loss, train, steps=300, batch_size=32,
                     mode="async", max_staleness=4, valid=valid,
                     metric_fn=classification_metrics, eval_every=100, timeout=300)
    assert [e["version"] for e in got.evals] == [0, 100, 200, 300]
    assert got.evals[-1]["accuracy"] >= 0.9, got.evals  # measured 0.95-0.97
    assert got.staleness_summary()["max"] <= 4


@pytest.mark.parametrize("mode,bound", [("sync", None), ("async", 1)])
def test_a_killed_worker_is_dropped_and_training_finishes(pool, mode, bound):
    steps = 30
    got = pool.train(_state(transforms.sgd(0.1)), fragile_loss, _data(fragile=2),
                     steps=steps, batch_size=BATCH, mode=mode, max_staleness=bound,
                     timeout=60)
    assert [w for w, _ in got.dropped] == [2] and got.dropped[0][1] >= DIE_AT - 1, got.dropped
    assert got.steps == steps and int(got.state.step) == steps
    assert got.lost <= 1  # at most the gradient it was computing
    if mode == "sync":  # steps after the death average 2 workers' gradients
        assert 2 * BATCH * steps < got.examples < WORKERS * BATCH * steps
    else:
        assert got.examples == steps * BATCH and got.staleness_summary()["max"] <= bound


def test_bad_input_is_one_line_before_ray_starts(monkeypatch):
    from jaxtrain.strategies import param_server

    monkeypatch.setattr(param_server, "ParamServerPool", None)  # no actor may start
    state, data = _state(transforms.sgd(0.1)), _data()
    cases = {
        "param server mode must be one of sync, async, got 'hogwild'": {"mode": "hogwild"},
        "param server max_staleness must be an integer >= 0 in mode 'async', got -1":
            {"mode": "async", "max_staleness": -1},
        "param server max_staleness is for mode 'async' (sync steps have none), got 2":
            {"max_staleness": 2},
        "param server batch_size 17 exceeds the smallest worker's share (16 examples of "
        "3 workers)": {"batch_size": 17},
        "param server steps must be a positive integer, got 0": {"steps": 0},
        "param server eval_every must be a positive integer, got 0": {"eval_every": 0},
        "param server workers must be a positive integer, got 0": {"workers": 0},
        "param server valid= needs a metric_fn= to evaluate": {"valid": data},
    }
    for message, kwargs in cases.items():
        with pytest.raises(JaxtrainError) as err:
            train_param_server(state, linear_loss, data,
                               **{"workers": WORKERS, "steps": 2, "batch_size": 4, **kwargs})
        assert str(err.value) == message
