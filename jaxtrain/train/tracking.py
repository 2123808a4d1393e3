"""Experiment trackers beside the JSONL log and TensorBoard: MLflow and Weights & Biases.

Each is an optional extra (`pip install "jaxtrain[mlflow]"`, `pip install "jaxtrain[wandb]"`)
chosen in the config's `logging:` section (`MlflowConfig`, `WandbConfig`). A tracker
follows the loggers' protocol (`log(run, step, metrics)`) plus `start(name, config,
folder)` at the start of `Trainer.fit` and `finish(checkpoint, outcome)` at its end: one
tracker run per `fit`, holding the run config (as hyperparameters), the train metrics as
`train/NAME` and the held-out ones as `eval/NAME` per step, the run config as a YAML file,
and the path of the final checkpoint. Only process 0 tracks (the `Trainer` calls these on
process 0 only). docs/tracking.md says what lands where.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from ..config import checked
from ..errors import JaxtrainError
from .config import LoggingConfig, MlflowConfig, WandbConfig, flatten

CONFIG_FILE = "run_config.yaml"  # the run config's file in each tracker's run


def _require(module: str, extra: str):
    """Import `module` of the optional `extra`, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise JaxtrainError(f"logging.{extra} needs the {module} package: "
                            f"pip install \"jaxtrain[{extra}]\"") from None


def metric_names(kind: str, metrics: dict) -> dict:
    """`{"loss": 0.3}` -> `{"train/loss": 0.3}` (`kind` is 'train' or 'eval')."""
    return {f"{kind}/{name}": float(value) for name, value in metrics.items()}


def _failed(extra: str, what: str, err: Exception) -> JaxtrainError:
    line = (str(err).strip().splitlines() or [""])[0][:300]
    return JaxtrainError(f"logging.{extra}: could not {what}: {type(err).__name__}: {line}")


OUTCOMES = ("finished", "killed", "failed")  # how a fit ended: done, stopped by a signal, error


class Tracker:
    """What the `Trainer` calls: `start` before the first step, `log` at each log point
    (`run` is the trainer's run name for training records, `RUN/eval` for evaluations),
    `finish` at the end of `fit` with the final checkpoint's path (or None) and how the fit
    ended (one of `OUTCOMES`)."""

    def start(self, name: str, config: dict, folder: Path | None) -> None: ...

    def log(self, run: str, step: int, metrics: dict) -> None: ...

    def finish(self, checkpoint: str | None, outcome: str = "finished") -> None: ...


def _kind(run: str) -> str:
    return "eval" if run.endswith("/eval") else "train"


class MlflowTracker(Tracker):
    """An MLflow run as `config` (an `MlflowConfig`) says: in its `experiment` (default:
    `MLFLOW_EXPERIMENT_NAME`, else MLflow's 'Default') of the tracking server or store
    `tracking_uri` (default: `MLFLOW_TRACKING_URI`, else MLflow's own, `sqlite:///mlflow.db`
    in the working folder), named `run_name` (default: the output folder's name). Params:
    the flattened run config (values as JSON text); metrics per step; artifact
    `run_config.yaml`; tag `checkpoint`. Metrics are sent asynchronously (MLflow's
    `synchronous=False`), so a slow tracking server does not hold up the training loop;
    `finish` waits for them."""

    def __init__(self, config: MlflowConfig | None = None):
        _require("mlflow", "mlflow")
        self.config = checked(config or MlflowConfig())
        self.client, self.run_id, self._sent = None, None, []

    def start(self, name: str, config: dict, folder: Path | None) -> None:
        from mlflow.entities import Param
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME
        from mlflow.tracking import MlflowClient

        experiment = self.config.experiment or MLFLOW_EXPERIMENT_NAME.get() or "Default"
        where = self.config.tracking_uri or "MLflow's default store"
        try:
            self.client = client = MlflowClient(self.config.tracking_uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else client.create_experiment(experiment))
            run = client.create_run(experiment_id, run_name=self.config.run_name or name)
        except Exception as err:  # a store or server that cannot be reached or written
            raise _failed("mlflow", f"start a run in {where}", err) from err
        self.run_id = run.info.run_id
        params = [Param(key, value if isinstance(value, str) else json.dumps(value, default=str))
                  for key, value in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            client.log_batch(self.run_id, params=params[i:i + 100])
        client.log_dict(self.run_id, config, CONFIG_FILE)

    def log(self, run: str, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key, value, stamp, int(step))
                 for key, value in metric_names(_kind(run), metrics).items()]
        self._sent.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def finish(self, checkpoint: str | None, outcome: str = "finished") -> None:
        for operation in self._sent:
            operation.wait()
        self._sent = []
        if checkpoint is not None:
            self.client.set_tag(self.run_id, "checkpoint", checkpoint)
        self.client.set_terminated(self.run_id, outcome.upper())  # MLflow's run statuses


class WandbTracker(Tracker):
    """A Weights & Biases run as `config` (a `WandbConfig`) says: `project`, `entity`,
    `name` (default: the output folder's name), `group`, `tags`, `mode` ('online',
    'offline' or 'disabled'; default: `WANDB_MODE`, else online), `dir` (default: the run's
    output folder, so `wandb/` lands beside `log.jsonl`). The run config is the W&B
    config; metrics are logged against a `step` metric (so evaluations and resumed runs may
    log any step); `run_config.yaml` is saved with the run; `checkpoint` is in its summary.
    At the end the run is finished (exit code 1 if the fit failed) and, unless another W&B
    run is active in the process, W&B's service process is ended."""

    def __init__(self, config: WandbConfig | None = None):
        self.wandb = _require("wandb", "wandb")
        self.config = checked(config or WandbConfig())
        self.run = None

    def start(self, name: str, config: dict, folder: Path | None) -> None:
        wandb, settings = self.wandb, asdict(self.config)
        settings["name"] = settings["name"] or name
        folder = settings.pop("dir") or folder or tempfile.gettempdir()
        Path(folder).mkdir(parents=True, exist_ok=True)
        try:
            if settings["mode"] in ("offline", "disabled"):
                # W&B's process-wide settings decide whether its own telemetry probes the
                # server: an offline run given only to `init` still would (seen in 0.31)
                wandb.setup(settings=wandb.Settings(mode=settings["mode"]))
            # console="off": W&B would wrap stdout/stderr (the progress bar, pytest's capture)
            self.run = run = wandb.init(**settings, dir=str(folder), config=config,
                                        reinit="create_new",
                                        settings=wandb.Settings(console="off", silent=True))
        except Exception as err:  # no API key, no network, a bad mode...
            raise _failed("wandb", "start a run", err) from err
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        if not run.disabled:  # a disabled run keeps no files
            path = Path(run.dir) / CONFIG_FILE
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            run.save(str(path), base_path=run.dir, policy="now")

    def log(self, run: str, step: int, metrics: dict) -> None:
        self.run.log({"step": int(step), **metric_names(_kind(run), metrics)})

    def finish(self, checkpoint: str | None, outcome: str = "finished") -> None:
        if checkpoint is not None:
            self.run.summary["checkpoint"] = checkpoint
        self.run.finish(exit_code=int(outcome == "failed"))
        self.run = None
        if self.wandb.run is None:  # no other run of the process needs W&B's service
            self.wandb.teardown()


TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


def make_trackers(logging: LoggingConfig) -> list[Tracker]:
    """The trackers a config's `logging` section selects (`mlflow: {...}`, `wandb: {...}`);
    one that is not installed is refused here, before any training."""
    return [cls(getattr(logging, name)) for name, cls in TRACKERS.items()
            if getattr(logging, name) is not None]
