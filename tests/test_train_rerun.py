"""Reruns and resumes are the same run: the best checkpoint, early stopping and the log
continue exactly; a rerun with other settings is refused; the final checkpoint is saved
before anything that may fail at the end; a killed `jaxtrain train` resumed ends bitwise
equal to an uninterrupted one, logs included."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_loop import MLP, _data

from jaxtrain import JaxtrainError, transforms
from jaxtrain.checkpoint import CheckpointConfig, Manager
from jaxtrain.cli import main
from jaxtrain.config import to_dict
from jaxtrain.train import (
    EarlyStoppingConfig,
    LoggingConfig,
    TrainConfig,
    Trainer,
    TrainerConfig,
    TrainState,
    classification_loss,
    classification_metrics,
    run_logs,
)
from jaxtrain.train.config import load_config
from jaxtrain.train.logs import keep_until, read_log
from jaxtrain.train.metrics import classification_report
from jaxtrain.train.run import fit_summary, rerun_config

CONFIG = Path(__file__).parent.parent / "configs" / "digits_cnn.yaml"


def _trainer(folder, every=None, plots=False, run_config=None, metric_fn=classification_metrics):
    state = TrainState.create(MLP(nnx.Rngs(0)), transforms.adam(2e-2), jax.random.PRNGKey(0))
    config = TrainerConfig(
        train=TrainConfig(batch_size=16, log_every=5), log_dir=folder, run_config=run_config,
        logging=LoggingConfig(progress=False, tensorboard=False, plots=plots),
        checkpoint=CheckpointConfig(dir=folder, every=every),
        early_stopping=EarlyStoppingConfig(patience=2, min_delta=0.01))
    return Trainer(state, classification_loss, config, metric_fn=metric_fn)


def _fit(trainer, steps):
    return trainer.fit(_data(), steps, eval_data=_data(48, 1), eval_every=5)


def _records(folder):
    return sorted((r["run"], r["step"], tuple(sorted((k, v) for k, v in r.items()
                                                      if k != "steps_per_second")))
                  for r in read_log(folder / "log.jsonl"))


def _untimed(record):
    """A checkpoint's resume record without the wall-clock rate in its last train metrics."""
    train = {k: v for k, v in (record.get("last_train") or {}).items()
             if k != "steps_per_second"}
    return {**record, "last_train": train}


def test_early_stopping_and_the_log_resume_exactly(tmp_path):
    straight = _trainer(tmp_path / "a", every=10)
    final = _fit(straight, 200)
    assert straight.stop_reason is not None and 20 < straight.step < 200
    first = _trainer(tmp_path / "b", every=10)
    _fit(first, 20)  # a run cut short at step 20 (its at-end checkpoint is step 20)
    with open(tmp_path / "b" / "log.jsonl", "a") as log:  # and the partial line of a kill
        log.write('{"run": "train", "step": 25, "lo')
    resumed = _trainer(tmp_path / "b", every=10)
    again = _fit(resumed, 200)
    assert resumed.start_step == 20
    assert (resumed.step, resumed.stop_reason) == (straight.step, straight.stop_reason)
    jax.tree.map(np.testing.assert_array_equal, again.params, final.params)
    assert _records(tmp_path / "b") == _records(tmp_path / "a")
    # a rerun of a finished run changes nothing
    before = _records(tmp_path / "b")
    rerun = _trainer(tmp_path / "b", every=10)
    done = _fit(rerun, 200)
    assert rerun.start_step == straight.step and rerun.stop_reason == straight.stop_reason
    jax.tree.map(np.testing.assert_array_equal, done.params, final.params)
    assert _records(tmp_path / "b") == before


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A run killed after step 20's checkpoint had logged steps 25 and 30 (and step 30's
    evaluation); its resume logs them again. TensorBoard's own reader sees each step once,
    with the resumed run's values, from both event files (before: the second evaluation
    of step 30 showed twice; a resume within the second of the first start overwrote the
    first event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train_loop import _trainer as plain_trainer

    def fit():
        trainer = plain_trainer(log_dir=tmp_path, log_every=5,
                                checkpoint=CheckpointConfig(dir=tmp_path / "ckpt", every=10),
                                logging=LoggingConfig(progress=False, plots=False))
        return trainer.fit(_data(), 30, eval_data=_data(48, 1), eval_every=10), trainer

    fit()
    with Manager(tmp_path / "ckpt") as mngr:  # the kill: step 30 was never saved
        mngr.delete(30)
    _, resumed = fit()
    assert resumed.start_step == 20
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    log = read_log(tmp_path / "log.jsonl")
    for tag, run, steps in [("train/loss", "train", [5, 10, 15, 20, 25, 30]),
                            ("train/eval/accuracy", "train/eval", [10, 20, 30])]:
        shown = [(e.step, e.value) for e in board.Scalars(tag)]
        name = tag.rsplit("/", 1)[1]
        logged = [(r["step"], float(np.float32(r[name]))) for r in log if r["run"] == run]
        assert [s for s, _ in shown] == steps and shown == logged, (tag, shown, logged)


def test_a_rerun_of_a_finished_run_reports_what_the_run_did(tmp_path):
    """The summary of a rerun that resumes at its last step (or a resume whose early
    stopping had already decided) equals the run's own: last train metrics, last
    evaluation, its per-class arrays and confusion matrix come back with the checkpoint
    (before: train {} and no eval_arrays, and no confusion.png drawn)."""
    first = _trainer(tmp_path, every=10, plots=True, metric_fn=classification_report)
    summary = fit_summary(first, _fit(first, 20), tmp_path)
    assert summary["train"] and summary["eval_arrays"]["confusion"]
    (tmp_path / "confusion.png").unlink()
    rerun = _trainer(tmp_path, every=10, plots=True, metric_fn=classification_report)
    state = _fit(rerun, 20)
    assert rerun.start_step == 20 and not rerun.history and not rerun.eval_history
    assert fit_summary(rerun, state, tmp_path) == summary
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def test_keep_until_drops_later_records_and_a_partial_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"run": "train", "step": s, "loss": 1.0 / s} for s in (5, 10, 15)]
    lines.append({"run": "other", "step": 15, "loss": 2.0})
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"run": "tr')
    assert len(read_log(log)) == 4
    keep_until(log, {"train", "train/eval"}, 10)
    assert [(r["run"], r["step"]) for r in read_log(log)] == [
        ("train", 5), ("train", 10), ("other", 15)]
    assert log.read_text().endswith("\n")


def test_the_final_checkpoint_is_saved_before_a_failing_plot(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(run_logs, "plot_history", broken)
    trainer = _trainer(tmp_path, plots=True)
    with pytest.warns(UserWarning, match="could not draw .*curves.png: RuntimeError"):
        trainer.fit(_data(), 7)
    assert Manager(tmp_path, read_only=True).steps() == [7]


def _saved_run(tmp_path, *overrides):
    """A checkpoint folder holding a run of configs/digits_cnn.yaml (+ overrides)."""
    out = tmp_path / "run"
    cfg = load_config(CONFIG, [f"out={out}", *overrides])
    state = TrainState.create(MLP(nnx.Rngs(0)), transforms.adam(1e-3), jax.random.PRNGKey(0))
    with Manager(out / "checkpoints") as mngr:
        mngr.save(5, state, {}, config=to_dict(cfg))
    return out


def _snapshot(folder):
    return sorted((str(p), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_a_rerun_with_other_settings_is_refused_naming_the_keys(tmp_path, capsys):
    out = _saved_run(tmp_path)
    before = _snapshot(out)
    code = main(["train", str(CONFIG), f"out={out}", "optimizer.learning_rate=0.01",
                 "train.batch_size=32", "train.steps=900", "logging.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "optimizer.learning_rate: 0.003 -> 0.01" in err and "train.batch_size: 64 -> 32" \
        in err and "train.steps" not in err and "--resume" in err
    assert _snapshot(out) == before
    # --resume continues with the saved settings (only where and how long come from now)
    cfg = load_config(CONFIG, [f"out={out}", "optimizer.learning_rate=0.01",
                               "train.steps=900"])
    resumed = rerun_config(cfg, resume=True)
    assert resumed.optimizer["learning_rate"] == 0.003 and resumed.train.steps == 900
    assert "ignoring optimizer.learning_rate" in capsys.readouterr().err
    with pytest.raises(JaxtrainError, match="no checkpoint in .* to resume"):
        rerun_config(load_config(CONFIG, [f"out={tmp_path / 'fresh'}"]), resume=True)
    # the same settings (steps aside) resume without a word
    assert rerun_config(load_config(CONFIG, [f"out={out}", "train.steps=900"])) is not None


def test_the_python_api_refuses_a_folder_of_another_config(tmp_path):
    first = _trainer(tmp_path, run_config={"lr": 0.1})
    _fit(first, 5)
    other = _trainer(tmp_path, run_config={"lr": 0.2})
    with pytest.raises(JaxtrainError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        _fit(other, 10)
    assert Manager(tmp_path, read_only=True).steps() == [5]


# -- a killed `jaxtrain train` ------------------------------------------------------------

def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return [sys.executable, "-m", "jaxtrain.cli", "train", str(CONFIG), *args], env


def _kill_after_a_checkpoint(args, folder, min_step):
    """Start the CLI, SIGKILL it once a checkpoint of step >= min_step is on disk."""
    command, env = _cli(*args)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()]
        if steps and max(steps) >= min_step:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


@pytest.mark.slow
def test_killed_cli_runs_resume_bitwise_with_evaluation_and_early_stopping(tmp_path):
    # configs/digits_cnn.yaml's settings (evaluation, best checkpoints, early stopping)
    # at a smaller scale; min_delta makes early stopping decide within the run
    common = ["train.steps=300", "train.eval_every=10", "train.log_every=5",
              "checkpoint.every=20", "early_stopping.min_delta=0.02", "logging.progress=false",
              "logging.tensorboard=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    command, env = _cli(f"out={a}", *common)
    straight = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    summary = json.loads(straight.stdout.splitlines()[0])
    assert summary["stopped"] and summary["step"] > 60, summary
    args = [f"out={b}", *common]
    assert _kill_after_a_checkpoint(args, b / "checkpoints", 20) == -signal.SIGKILL
    assert _kill_after_a_checkpoint(args, b / "checkpoints", 60) == -signal.SIGKILL
    command, env = _cli(*args)
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads(resumed.stdout.splitlines()[0])
    for key in ("step", "eval", "stopped"):
        assert again[key] == summary[key], key
    assert _records(b) == _records(a)
    steps = Manager(a / "checkpoints", read_only=True).steps()
    assert Manager(b / "checkpoints", read_only=True).steps() == steps
    for step in steps:
        with Manager(a / "checkpoints", read_only=True) as ma, \
                Manager(b / "checkpoints", read_only=True) as mb, warnings.catch_warnings():
            warnings.simplefilter("error")
            jax.tree.map(np.testing.assert_array_equal, mb.restore_arrays(step),
                         ma.restore_arrays(step))
            assert _untimed(mb.meta(step)["record"]) == _untimed(ma.meta(step)["record"])
