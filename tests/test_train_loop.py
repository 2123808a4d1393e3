"""Trainer.fit: logs (JSONL, TensorBoard, PNG), evaluation, callbacks, the non-finite
policy, exact in-process resume and signals, and the data order of `batch_at`."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import JaxtrainError, sharding, transforms
from jaxtrain.checkpoint import CheckpointConfig, Manager
from jaxtrain.data import batch_at
from jaxtrain.train import (
    Batches,
    Callback,
    EarlyStopping,
    LoggingConfig,
    NonFiniteError,
    TrainConfig,
    Trainer,
    TrainerConfig,
    TrainState,
    classification_loss,
    classification_metrics,
    fit,
    make_train_step,
)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"image": x, "label": (x[:, :3].argmax(1)).astype(np.int32)}


QUIET = LoggingConfig(progress=False)


def _trainer(callbacks=(), log_dir=None, checkpoint=None, logging=QUIET, **train):
    """The MLP's Trainer, batches of 16, held-out accuracy monitored; `train`: keys of
    the train section."""
    state = TrainState.create(MLP(nnx.Rngs(0)), transforms.adam(1e-2), jax.random.PRNGKey(0))
    config = TrainerConfig(train=TrainConfig(batch_size=16, **train), logging=logging,
                           checkpoint=checkpoint or CheckpointConfig(), log_dir=log_dir,
                           monitor="accuracy", mode="max")
    return Trainer(state, classification_loss, config, metric_fn=classification_metrics,
                   callbacks=callbacks)


def test_fit_logs_jsonl_tensorboard_and_curves(tmp_path):
    trainer = _trainer(log_dir=tmp_path, log_every=5)
    state = trainer.fit(_data(), 20, eval_data=_data(48, 1), eval_every=10)
    assert int(state.step) == 20 and [s for s, _ in trainer.history] == [5, 10, 15, 20]
    assert {"loss", "grad_norm", "learning_rate", "accuracy"} <= set(trainer.history[-1][1])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    assert [r["step"] for r in records if r["run"] == "train/eval"] == [10, 20]
    assert trainer.history[-1][1]["loss"] == [r for r in records if r["run"] == "train"][-1][
        "loss"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert trainer.eval_history[-1][1]["accuracy"] > 0.5


def test_batches_are_batch_at():
    data = _data(50)
    feed = Batches(data, 16, seed=3)
    for position in (0, 2, 3, 7, 3):
        got, want = feed.get(position, 1), batch_at(data, 16, 3, position)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    stacked = feed.get(4, 3)
    np.testing.assert_array_equal(stacked["label"][2], batch_at(data, 16, 3, 6)["label"])
    with pytest.raises(JaxtrainError, match="batch_size"):
        Batches(data, 51, 0)


def test_resume_from_checkpoint_folder_is_bitwise_in_process(tmp_path):
    straight = _trainer().fit(_data(), 14)
    first = _trainer(checkpoint=CheckpointConfig(dir=tmp_path, every=5, async_=False))
    first.fit(_data(), 7)  # saves 5 and 7 (the end)
    assert Manager(tmp_path, read_only=True).steps() == [5, 7]
    resumed = _trainer(checkpoint=CheckpointConfig(dir=tmp_path)).fit(_data(), 14)
    assert int(resumed.step) == 14 and int(resumed.data_position) == 14
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)


def test_checkpoints_every_n_on_best_and_at_end(tmp_path):
    trainer = _trainer(checkpoint=CheckpointConfig(dir=tmp_path, every=4, best=True,
                                                   max_to_keep=None, async_=False))
    trainer.fit(_data(), 10, eval_data=_data(48, 1), eval_every=3)
    steps = Manager(tmp_path, read_only=True).steps()
    assert {4, 8, 10} <= set(steps)  # every 4, the end
    best = [s for s, m in trainer.eval_history
            if m["accuracy"] == max(x["accuracy"] for _, x in trainer.eval_history)]
    assert best[0] in steps  # the first best evaluation was saved


class _FakeTrainer:
    monitor, mode = "loss", "min"

    def __init__(self):
        self.reason = None

    def stop(self, reason):
        self.reason = reason


def _fake_state(value):
    return TrainState.create(lambda p, x: x, optax.sgd(0.1), jax.random.PRNGKey(0),
                             params={"w": jnp.full((2,), value)})


def test_early_stopping_stops_after_patience_and_restores_the_best():
    stopper, trainer = EarlyStopping(patience=2, min_delta=0.05), _FakeTrainer()
    stopper.on_fit_start(trainer, None)
    for step, loss in enumerate([1.0, 0.5, 0.48, 0.6]):  # 0.48 is not 0.05 better than 0.5
        stopper.on_eval(trainer, step, {"loss": loss}, _fake_state(float(step)))
    assert trainer.reason is not None and "best 0.5 at step 1" in trainer.reason
    restored = stopper.restore(_fake_state(9.0))
    np.testing.assert_array_equal(restored.params["w"], [1.0, 1.0])
    with pytest.raises(JaxtrainError, match="monitors 'loss'"):
        stopper.on_eval(trainer, 5, {"accuracy": 1.0}, _fake_state(0.0))


def test_fit_with_early_stopping_ends_early_with_best_params():
    trainer = _trainer(callbacks=[EarlyStopping(monitor="loss", mode="max", patience=1)])
    # "max" of the held-out loss: the first evaluation is best, so the second one stops.
    state = trainer.fit(_data(), 50, eval_data=_data(48, 1), eval_every=5)
    assert int(state.step) == 10 and "early stopping" in trainer.stop_reason
    # the params of step 5, from a run that simply stops there (not the callback's copy)
    five = _trainer().fit(_data(), 5)
    jax.tree.map(np.testing.assert_array_equal, state.params, five.params)


def _nan_at_7_loss(params, batch, rng):
    # finite value; d/db = 0 * inf = nan where the batch's p is 0 (position 7)
    p = jnp.mean(batch["p"])
    bad = 0.0 * jnp.sum(jnp.sqrt(jnp.abs(params["b"]) + p))
    return jnp.mean((batch["x"] @ params["a"]) ** 2) + bad, {}


def _nan_at_7_data(position):
    return {"x": np.ones((8, 3), np.float32),
            "p": np.full(8, 0.0 if position == 7 else 1.0, np.float32)}


def test_nan_raise_never_checkpoints_a_bad_state(tmp_path):
    """Metrics are read every 50 steps, but the save at step 10 sees the bad step 7."""
    state = TrainState.create(lambda p, x: x, optax.sgd(0.01), jax.random.PRNGKey(0),
                              params={"a": jnp.ones(3), "b": jnp.zeros(2)})
    trainer = Trainer(state, _nan_at_7_loss, TrainerConfig(
        train=TrainConfig(log_every=50), logging=QUIET,
        checkpoint=CheckpointConfig(dir=tmp_path, every=5, async_=False)))
    with pytest.raises(NonFiniteError, match=r"step 7: first non-finite is gradient b"):
        trainer.fit(_nan_at_7_data, 30)
    saved = Manager(tmp_path, read_only=True)
    assert saved.steps() == [5]
    restored = saved.restore(state, trainer.signature)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def test_nan_raise_names_the_step_and_the_first_bad_path(devices):
    loss, data = _nan_at_7_loss, _nan_at_7_data
    state = TrainState.create(lambda p, x: x, optax.sgd(0.01), jax.random.PRNGKey(0),
                              params={"a": jnp.ones(3), "b": jnp.zeros(2)})
    trainer = Trainer(state, loss, TrainerConfig(train=TrainConfig(log_every=5), logging=QUIET))
    with pytest.raises(NonFiniteError, match=r"step 7: first non-finite is gradient b"):
        trainer.fit(data, 30)
    skipping = Trainer(TrainState.create(lambda p, x: x, optax.sgd(0.01),
                                         jax.random.PRNGKey(0),
                                         params={"a": jnp.ones(3), "b": jnp.zeros(2)}),
                       loss, TrainerConfig(train=TrainConfig(nan_policy="skip"), logging=QUIET))
    with pytest.warns(UserWarning, match=r"nan_policy='skip': 1 of the 10 step\(s\) to step "
                                         r"10 had non-finite values and were skipped"):
        final = skipping.fit(data, 10)
    assert int(final.step) == 10 and final.nonfinite.tolist() == [7, 2, 1]
    assert skipping.history[-1][1]["skipped_steps"] == 1


def test_nan_skip_stops_after_too_many_in_a_row():
    def data(position):
        return {"x": np.ones((8, 3), np.float32),
                "p": np.full(8, 0.0 if position >= 2 else 1.0, np.float32)}

    state = TrainState.create(lambda p, x: x, optax.sgd(0.01), jax.random.PRNGKey(0),
                              params={"a": jnp.ones(3), "b": jnp.zeros(2)})
    trainer = Trainer(state, _nan_at_7_loss, TrainerConfig(
        train=TrainConfig(nan_policy="skip", log_every=2), logging=QUIET))
    with pytest.warns(UserWarning), pytest.raises(
            NonFiniteError, match="the last 10 steps were all skipped; non-finite value at "
                                  "step 2: first non-finite is gradient b"):
        trainer.fit(data, 100)
    # the 10th skip in a row is step 12; the host reads it at a log step and may have run
    # ahead by the calls in flight (16 on simulated devices: 24 was seen under load)
    assert trainer.step <= 12 + trainer.log_every + 16


class _SendSignal(Callback):
    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def on_step_end(self, trainer, before, step, state):
        if step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_ends_cleanly(tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = _trainer(checkpoint=CheckpointConfig(dir=tmp_path),
                       callbacks=[_SendSignal(6, signum)])
    state = trainer.fit(_data(), 1000)
    assert trainer.interrupted == signal.Signals(signum).name and int(state.step) == 6
    assert Manager(tmp_path, read_only=True).steps() == [6]
    assert signal.getsignal(signum) is before


def test_steps_per_call_trains_like_single_steps():
    single = _trainer().fit(_data(), 12)
    multi_trainer = _trainer(steps_per_call=4, log_every=4)
    multi = multi_trainer.fit(_data(), 14)  # 3 calls of 4, then 2 single steps
    assert int(multi.step) == 14 and [s for s, _ in multi_trainer.history] == [4, 8, 12, 14]
    again = _trainer(steps_per_call=4).fit(_data(), 12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 again.params, single.params)


def test_device_resident_data_gives_the_host_fed_batches(devices):
    host = _trainer(device_data=False, steps_per_call=2).fit(_data(), 15)
    device = _trainer(device_data=True, steps_per_call=2).fit(_data(), 15)  # crosses epochs
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 device.params, host.params)
    assert int(device.data_position) == 15


def test_calls_between_log_points_train_like_logged_ones():
    """Calls that reach no log point drop their metric work, not their update."""
    every = _trainer(log_every=1)
    sparse = _trainer(log_every=5)
    a, b = every.fit(_data(), 12), sparse.fit(_data(), 12)
    assert [s for s, _ in sparse.history] == [5, 10, 12]
    assert len(every.history) == 12
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_long_log_intervals_on_eight_cpu_devices_do_not_deadlock(devices):
    """With ~32 calls in flight XLA:CPU's collectives hang and abort the process; the loops
    bound what they queue there (`sharding.InFlight`)."""
    trainer = _trainer(log_every=10_000, logging=LoggingConfig(progress=False, plots=False))
    assert trainer.mesh.size == 8
    assert int(trainer.fit(_data(), 400).step) == 400
    state = trainer.state
    data = _data()
    step = sharding.compile_step(make_train_step(classification_loss), trainer.mesh,
                                 trainer.state_shardings)
    state, history = fit(state, step, lambda s: batch_at(data, 16, 0, s), 800, trainer.mesh,
                         log_every=10_000, progress=False)
    assert int(state.step) == 800 and history[-1][0] == 800


def test_both_loops_train_up_to_steps():
    """`steps` is the step to reach, in `Trainer.fit` and in `fit` alike: from step 3,
    `steps=5` takes 2 more steps; a state already there takes none."""
    trainer = _trainer(logging=LoggingConfig(progress=False, plots=False), log_every=1)
    data = _data()
    trainer.fit(data, 3)
    state = trainer.fit(data, 5)
    assert int(state.step) == 5 and [s for s, _ in trainer.history][-2:] == [4, 5]
    step = sharding.compile_step(make_train_step(classification_loss), trainer.mesh,
                                 trainer.state_shardings)
    batches = lambda s: batch_at(data, 16, 0, s)  # noqa: E731
    state, history = fit(state, step, batches, 7, trainer.mesh, log_every=1, progress=False)
    assert int(state.step) == 7 and [s for s, _ in history] == [6, 7]
    state, history = fit(state, step, batches, 7, trainer.mesh, progress=False)
    assert int(state.step) == 7 and history == []


def test_raise_policy_checks_the_updated_params_and_writes_no_checkpoint(tmp_path):
    # a learning rate that is finite in float64 but not in float32: finite loss and
    # gradients, infinite params after the first update
    state = TrainState.create(MLP(nnx.Rngs(0)), optax.sgd(1e39), jax.random.PRNGKey(0))
    trainer = Trainer(state, classification_loss, TrainerConfig(
        train=TrainConfig(batch_size=16, log_every=1), logging=QUIET,
        checkpoint=CheckpointConfig(dir=tmp_path, every=1)))
    with pytest.raises(NonFiniteError, match="at step 0: first non-finite is updated param "
                                             "l1/bias"):
        trainer.fit(_data(), 5)
    assert Manager(tmp_path, read_only=True).steps() == []


def test_compilation_cache_lets_a_second_start_load_the_step(tmp_path, caplog):
    """`train.compilation_cache`: the first start compiles the train step and writes it; a
    second start (nothing compiled in memory) loads it from the folder."""
    import logging

    from jax.experimental.compilation_cache import compilation_cache

    caplog.set_level(logging.DEBUG, logger="jax._src.compiler")
    try:
        starts = []
        for _ in range(2):
            jax.clear_caches()  # a new start: only the folder remembers
            trainer = _trainer(compilation_cache=str(tmp_path / "cache"))
            caplog.clear()  # what fit compiles: the train step, the eval step, ...
            trainer.fit(_data(), 2)
            starts.append({kind: sorted(r.args[0] for r in caplog.records
                                        if r.getMessage().startswith(prefix))
                           for kind, prefix in (("hit", "Persistent compilation cache hit"),
                                                ("miss", "PERSISTENT COMPILATION CACHE MISS"))})
        assert starts[0]["hit"] == [] and "jit_call" in starts[0]["miss"]  # the train step
        assert starts[1] == {"hit": starts[0]["miss"], "miss": []}
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        compilation_cache.reset_cache()
