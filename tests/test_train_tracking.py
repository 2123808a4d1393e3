"""Experiment trackers (`logging.mlflow`, `logging.wandb`): one tiny config run tracked by
both, read back through each tool's own reader (MLflow's client over a local sqlite store; W&B's
`wandb leet inspect` over an offline run) and compared with jaxtrain's JSONL log. The run
may look up no host name (an offline W&B run must not reach the network) and must leave no
W&B service process behind."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import psutil
import pytest
import yaml
from flax import nnx
from test_train_loop import MLP, _data

from jaxtrain import JaxtrainError, sharding, transforms
from jaxtrain.checkpoint import CheckpointConfig
from jaxtrain.config import to_dict
from jaxtrain.train import (
    TrainConfig,
    Trainer,
    TrainerConfig,
    TrainState,
    classification_loss,
    classification_metrics,
)
from jaxtrain.train.config import LoggingConfig, WandbConfig, flatten, load_config
from jaxtrain.train.logs import read_log
from jaxtrain.train.run import run_config
from jaxtrain.train.tracking import Tracker, WandbTracker, make_trackers

getaddrinfo = socket.getaddrinfo
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_cnn.yaml"


def _config(out: Path, *logging: str):
    """digits_cnn.yaml made tiny: an MLP, 6 steps, each logged (one compiled variant of the
    step), eval every 3, one checkpoint at the end."""
    return load_config(CONFIG, [
        f"out={out}", "model={name: mlp, hidden: [16]}", "train.steps=6", "train.log_every=1",
        "train.eval_every=3", "checkpoint.every=null",
        "checkpoint.best=false", "early_stopping=null", "logging.progress=false",
        "logging.tensorboard=false", "logging.plots=false", *logging])


def _logged(out: Path) -> dict:
    """{(train|eval/NAME, step): value} of jaxtrain's own JSONL log."""
    kinds = {"train": "train", "train/eval": "eval"}
    return {(f"{kinds[r['run']]}/{name}", r["step"]): value
            for r in read_log(out / "log.jsonl") for name, value in r.items()
            if name not in ("run", "step")}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny config run tracked by MLflow (a sqlite store) and W&B (offline) at once:
    its config, its output folder and the MLflow store's URI."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "tiny"
    looked_up = []

    def lookup(host, *args, **kwargs):  # records and refuses any name but this machine's
        if host not in ("localhost", "127.0.0.1", "::1", None):
            looked_up.append(host)
            raise OSError(f"the test refuses to look up {host}")
        return getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # MLflow keeps artifacts in ./mlruns beside a sqlite store
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(var, str(tmp / var.lower()))  # nothing under $HOME
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow's usage reports
        patch.setattr(socket, "getaddrinfo", lookup)
        cfg = _config(out, f"logging.mlflow={{tracking_uri: '{uri}', experiment: digits}}",
                      "logging.wandb={project: digits, mode: offline, tags: [tiny]}")
        run_config(cfg)
        children = [p.name() for p in psutil.Process().children(recursive=True)]
    assert not looked_up, f"the tracked run tried the network: {looked_up}"
    # W&B's usage telemetry exports from OpenTelemetry threads, later than the run's end:
    # none may be running after an offline run (wandb 0.31 started them when the offline
    # mode was given to `wandb.init` alone)
    exporters = [t.name for t in threading.enumerate() if t.name.startswith("Otel")]
    assert not exporters, f"telemetry exporters left running: {exporters}"
    return cfg, out, uri, children


def test_mlflow_records_params_metrics_config_and_checkpoint(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, out, uri, _ = tracked
    cfg = to_dict(cfg)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = flatten(cfg)
    assert run.data.params["train.steps"] == "6" and run.data.params["out"] == str(out)
    assert run.data.params["optimizer.learning_rate"] == json.dumps(params[
        "optimizer.learning_rate"])
    assert set(run.data.params) == set(params)
    logged = _logged(out)
    recorded = {(key, m.step): m.value for key in run.data.metrics
                for m in client.get_metric_history(run.info.run_id, key)}
    assert recorded == logged
    assert {s for k, s in logged if k == "eval/accuracy"} == {3, 6}
    assert {s for k, s in logged if k == "train/loss"} == {1, 2, 3, 4, 5, 6}
    saved = client.download_artifacts(run.info.run_id, "run_config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(saved).read_text()) == cfg
    assert run.data.tags["checkpoint"] == str(out.absolute() / "checkpoints" / "6")
    assert Path(run.data.tags["checkpoint"]).is_dir()


def test_wandb_offline_records_config_metrics_and_checkpoint(tracked):
    cfg, out, _, children = tracked
    cfg = to_dict(cfg)
    assert not [name for name in children if "wandb" in name], \
        f"W&B's service outlived the fit: {children}"
    [run_dir] = (out / "wandb").glob("offline-run-*")
    reader = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                             str(run_dir)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert reader.returncode == 0, reader.stderr[-2000:]
    records = [json.loads(line) for line in reader.stdout.splitlines()
               if line.startswith("{")]
    [start] = [r["run"] for r in records if r["type"] == "run"]
    assert start["project"] == "digits" and start["display_name"] == "tiny"
    assert start["tags"] == ["tiny"]
    config = {k: v for k, v in start["config"]["update"].items() if k != "_wandb"}
    assert config == json.loads(json.dumps(cfg))
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    recorded = {(key, row["step"]): value for row in rows for key, value in row.items()
                if not key.startswith("_") and key != "step"}
    assert recorded == _logged(out)
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["checkpoint"] == str(out.absolute() / "checkpoints" / "6")
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]
    assert yaml.safe_load((run_dir / "files" / "run_config.yaml").read_text()) == cfg


@pytest.mark.parametrize("module, extra", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_extra_is_one_line_before_training(tmp_path, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import mlflow` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(JaxtrainError) as err:
        run_config(_config(out, f"logging.{extra}={{}}"))
    assert str(err.value) == (f"logging.{extra} needs the {module} package: "
                              f"pip install \"jaxtrain[{extra}]\"")
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()
    assert make_trackers(LoggingConfig()) == []


@pytest.mark.parametrize("override, message", [
    ("logging.mlflow={experimnt: x}", "unknown config key 'logging.mlflow.experimnt' (valid: "
                                      "tracking_uri, experiment, run_name); did you mean "
                                      "'logging.mlflow.experiment'?"),
    ("logging.wandb={mode: ofline}", "config key 'logging.wandb.mode' must be online, "
                                     "offline or disabled, got 'ofline'"),
    ("logging.wandb.tags=x", "config key 'logging.wandb.tags' must be list or null, got str"),
    ("logging.mlflow=1", "config key 'logging.mlflow' must be mapping or null, got int 1"),
])
def test_bad_tracker_keys_are_named(override, message):
    with pytest.raises(JaxtrainError) as err:
        load_config(CONFIG, [override])
    assert str(err.value) == message or str(err.value).startswith(message)
    with pytest.raises(JaxtrainError, match="'mode' must be online, offline or disabled"):
        WandbTracker(WandbConfig(mode="ofline"))  # built in Python: checked alike


class Recorder(Tracker):
    """A tracker that records the Trainer's calls (and fails to log at `fail_at`)."""

    def __init__(self):
        self.calls, self.fail_at = [], None

    def start(self, name, config, folder):
        self.calls.append(("start", name, config, folder))

    def log(self, run, step, metrics):
        if step == self.fail_at:
            raise RuntimeError("the tracking server went away")
        self.calls.append(("log", run, step, sorted(metrics)))

    def finish(self, checkpoint, outcome="finished"):
        self.calls.append(("finish", checkpoint, outcome))


def test_trainer_tracks_on_process_0_only_and_ends_each_fit(tmp_path, monkeypatch):
    recorder, out = Recorder(), tmp_path / "run"
    state = TrainState.create(MLP(nnx.Rngs(0)), transforms.adam(1e-2), jax.random.PRNGKey(0))
    config = TrainerConfig(
        train=TrainConfig(batch_size=16, log_every=1), log_dir=out, run_config={"seed": 0},
        logging=LoggingConfig(progress=False, tensorboard=False, plots=False),
        checkpoint=CheckpointConfig(dir=out / "ck"))
    trainer = Trainer(state, classification_loss, config, metric_fn=classification_metrics,
                      trackers=[recorder])
    with monkeypatch.context() as patch:  # another process of a multi-process run
        patch.setattr(sharding, "is_main_process", lambda: False)
        trainer.fit(_data(), 2)
    assert recorder.calls == [] and (out / "ck" / "2").is_dir()

    trainer.fit(_data(), 4, eval_data=_data(48, 1), eval_every=4)
    start, *logs, finish = recorder.calls
    assert start == ("start", "run", {"seed": 0}, out)
    assert sorted(call[1:3] for call in logs) == [("train", 3), ("train", 4),
                                                  ("train/eval", 4)]
    assert {"loss", "accuracy"} <= {name for call in logs for name in call[3]}
    assert finish == ("finish", str((out / "ck" / "4").absolute()), "finished")

    recorder.calls, recorder.fail_at = [], 6  # a tracker error ends the fit, run marked failed
    with pytest.raises(RuntimeError, match="went away"):
        trainer.fit(_data(), 6)
    assert recorder.calls[0][0] == "start" and recorder.calls[-1][::2] == ("finish", "failed")
