"""Run configs: a YAML file plus `key=value` overrides -> a checked `RunConfig` -> a run.

A run config is the root of the sections each layer declares (`train`, `early_stopping`,
`logging` here; `sharding` in `jaxtrain.sharding.config`, `checkpoint` in
`jaxtrain.checkpoint.config`), read by the generic loader of `jaxtrain.config`. Every key,
its type, default and doc: `jaxtrain config --keys` or docs/config.md. `model`, `data` and
`optimizer` are free-form: the keyword arguments of a registry entry (`model: {name: cnn,
channels: 16}`), and the optimizer spec checked by `jaxtrain.transforms.spec.build`.

Model kwargs the data set knows (`num_classes`, `vocab_size`, ...) are filled in from
the data's `info` when the model takes them and the config does not set them. A run's
config is saved with its checkpoints as a plain mapping (`to_dict`); a rerun into the same
folder must match it but for `RERUN_FREE` keys (`config_changes`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.config import CheckpointConfig
from ..config import load, named, option, read_yaml, section, set_key, shorthands, to_dict
from ..data.augment import check_augment
from ..sharding.config import ShardingConfig
from ..strategies.config import DistillConfig, LocalSGDConfig, PrivacyConfig


@dataclass(frozen=True)
class TrainConfig:
    """How the train loop runs (`Trainer`, `Trainer.fit`)."""

    steps: int = option(1000, "train until the state's step reaches this total (a resumed "
                              "run ends where an uninterrupted one would)", positive=True)
    batch_size: int = option(64, "examples per step, over all devices", positive=True)
    microbatches: int = option(1, "split each batch into this many, accumulating the "
                                  "gradient (same update, less memory)", positive=True)
    steps_per_call: int = option(1, "steps per compiled call (fewer dispatches)",
                                 positive=True)
    precision: str = option("auto", "auto, float32, bfloat16, bfloat16_params or float16 "
                                    "(auto: float32 on CPU, bfloat16 compute elsewhere)")
    nan_policy: str = option("raise", "a non-finite loss or gradient: raise (stop, name "
                                      "it), skip (skip the step) or none (no checks)")
    eval_every: int | None = option(None, "evaluate on held-out data every this many steps "
                                          "and at the end (null: at the end only)",
                                    positive=True)
    eval_batch_size: int = option(256, "examples per evaluation batch", positive=True)
    log_every: int = option(10, "log train metrics every this many steps", positive=True)
    ema_decay: float | None = option(None, "keep an exponential moving average of the "
                                           "params with this decay; evaluate it (null: none)")
    device_data: bool | str = option("auto", "keep the whole data set on the devices: "
                                             "auto (when it fits), true or false",
                                     choices=("auto", True, False))
    compilation_cache: str | None = option(
        None, "folder of JAX's persistent compilation cache: a later start with the same "
              "step, devices and versions loads the compiled programs instead of compiling "
              "(null: none; the folder is trusted code)")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when a held-out metric stops improving (`jaxtrain.train.EarlyStopping`)."""

    patience: int = option(5, "evaluations without improvement before stopping",
                           positive=True)
    min_delta: float = option(0.0, "smallest change that counts as an improvement")
    monitor: str | None = option(None, "held-out metric to watch (null: the task's)")
    mode: str | None = option(None, "min or max (null: the task's)")


@dataclass(frozen=True)
class MlflowConfig:
    """An MLflow run per fit (`jaxtrain.train.tracking.MlflowTracker`; docs/tracking.md)."""

    tracking_uri: str | None = option(None, "tracking server or store, e.g. "
                                            "sqlite:///mlflow.db (null: MLFLOW_TRACKING_URI, "
                                            "else MLflow's default)")
    experiment: str | None = option(None, "experiment name, created if missing (null: "
                                          "MLFLOW_EXPERIMENT_NAME, else Default)")
    run_name: str | None = option(None, "run name (null: the output folder's name)")


@dataclass(frozen=True)
class WandbConfig:
    """A Weights & Biases run per fit (`jaxtrain.train.tracking.WandbTracker`;
    docs/tracking.md)."""

    project: str | None = option(None, "W&B project (null: WANDB_PROJECT or W&B's default)")
    entity: str | None = option(None, "W&B entity: user or team (null: W&B's default)")
    name: str | None = option(None, "run display name (null: the output folder's name)")
    group: str | None = option(None, "W&B run group")
    tags: list | None = option(None, "W&B run tags")
    mode: str | None = option(None, "online, offline or disabled (null: WANDB_MODE, else "
                                    "online)", choices=("online", "offline", "disabled"))
    dir: str | None = option(None, "where W&B's wandb/ folder goes (null: the output "
                                   "folder)")


@dataclass(frozen=True)
class LoggingConfig:
    """What a run writes besides log.jsonl."""

    tensorboard: bool = option(True, "write TensorBoard event files to OUT/tensorboard")
    plots: bool = option(True, "draw OUT/curves.png (and confusion.png) at the end")
    progress: bool = option(True, "show a progress bar (plain lines when not a terminal)")
    mlflow: MlflowConfig | None = option(None, "track the run in MLflow (pip install "
                                               "\"jaxtrain[mlflow]\"; null: no)")
    wandb: WandbConfig | None = option(None, "track the run in Weights & Biases (pip install "
                                             "\"jaxtrain[wandb]\"; null: no)")


def _data(key: str, value) -> dict:
    value = named(key, value)
    if "augment" in value:
        value = {**value, "augment": check_augment(value["augment"])}
    return value


@dataclass(frozen=True)
class _Seed:
    """The first key of a run config and of a Trainer's."""

    seed: int = option(0, "random seed: the data order, and in `jaxtrain train` the model "
                          "init and dropout", minimum=0)


@dataclass(frozen=True)
class _RunSetup(_Seed):
    """What a run trains (the keys of `RunConfig` before `TrainerSections`')."""

    out: str = option("runs/train", "output folder: log.jsonl, TensorBoard, curves.png, "
                                    "checkpoints/")
    model: dict = option(None, "{name, **kwargs}: a model of jaxtrain.models.registry and "
                               "its keyword arguments (free-form; a bare name is allowed)",
                         parse=named, shorthand="name", required=True)
    data: dict = option(None, "{name, augment, **kwargs}: a data set of "
                              "jaxtrain.data.registry and its keyword arguments "
                              "(free-form); augment: see docs/augmentation.md",
                        parse=_data, shorthand="name", required=True)
    task: str = option(None, "what the model is trained for: a task of "
                             "jaxtrain.train.tasks (classification, language_model, "
                             "regression)", required=True)
    optimizer: dict = option(None, "the transforms spec {optimizer, learning_rate, ...} "
                                   "(free-form, checked by jaxtrain.transforms.spec.build; "
                                   "see docs/transforms.md)", shorthand="optimizer", required=True)
    distill: DistillConfig | None = option(
        None, "learn from a teacher checkpoint (task classification; null: off)")
    local_sgd: LocalSGDConfig | None = option(
        None, "communication-light data parallelism: local SGD / DiLoCo (null: off)")
    privacy: PrivacyConfig | None = option(
        None, "DP-SGD on Poisson batches of expected size train.batch_size (null: off)")


@dataclass(frozen=True)
class TrainerSections(_Seed):
    """The sections a `Trainer` reads: declared once here, for both `RunConfig` and
    `TrainerConfig`."""

    train: TrainConfig = section(TrainConfig, "the train loop")
    sharding: ShardingConfig = section(ShardingConfig, "device mesh and partition rules")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Orbax checkpoints")
    early_stopping: EarlyStoppingConfig | None = option(
        None, "stop when a held-out metric stops improving (null: never)")
    logging: LoggingConfig = section(LoggingConfig, "what is written besides log.jsonl")


@dataclass(frozen=True)
class RunConfig(TrainerSections, _RunSetup):
    """What `jaxtrain train CONFIG` runs: the model, data, task and optimizer
    (`_RunSetup`), and the sections of the layers that train it (`TrainerSections`)."""


@dataclass(frozen=True)
class TrainerConfig(TrainerSections):
    """What a `Trainer` is told besides its state, loss, metrics and callbacks: the
    `TrainerSections` of a run config (there `checkpoint.dir` null means no checkpoints,
    and `train.steps` and `train.eval_every` are `fit`'s defaults), and what `jaxtrain
    train` works out from the task and the command. Built in Python
    (`TrainerConfig(train=TrainConfig(batch_size=32))`) or from a run config
    (`jaxtrain.train.run.config_trainer`)."""

    log_dir: str | None = option(None, "folder of log.jsonl, TensorBoard and curves.png "
                                       "(null: no logs)")
    monitor: str = option("loss", "the held-out metric 'best' refers to (checkpoint.best, "
                                  "early stopping's default)")
    mode: str = option("min", "whether a lower or a higher `monitor` is better",
                       choices=("min", "max"))
    run: str = option("train", "the run's name in the logs (its eval records: RUN/eval)")
    eval_ema: bool = option(True, "evaluate the EMA params where the state keeps them")
    handle_signals: bool = option(True, "SIGTERM/SIGINT save a checkpoint and end fit")
    model_config: dict | None = option(None, "the model's registry entry {name, **kwargs}, "
                                             "recorded with checkpoints and checked on "
                                             "restore")
    run_config: dict | None = option(None, "the run config recorded with checkpoints; a "
                                           "folder holding another one is refused")


# Keys that may be given as a bare string, and the key the string stands for.
SHORTHAND = shorthands(RunConfig)


# Keys a rerun into the same folder may change and still be the same run: where it writes,
# how long it trains (a total, so more steps continue it), how it reports, how prepared
# records are read (the batches do not depend on it).
RERUN_FREE = ("out", "checkpoint.dir", "checkpoint.async", "train.steps",
              "train.compilation_cache", "logging",
              "data.workers", "data.threads", "data.prefetch", "data.verify")


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (an empty section stays as `{}`)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RERUN_FREE)


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for each dotted key whose value differs between a saved
    run config and a new one (keys in `RERUN_FREE` excepted). A run config key the saved
    one lacks (added to jaxtrain since it was saved) counts as having its default."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(to_dict(RunConfig()))
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key, missing)), new.get(key, missing)
        if not _free(key) and a != b:
            changes.append(f"{key}: {'(none)' if a is missing else a!r} -> "
                           f"{'(none)' if b is missing else b!r}")
    return changes


def with_rerun_free(saved: dict, current: dict) -> dict:
    """The saved config with the `RERUN_FREE` keys of `current` (what `--resume` runs)."""
    merged = copy.deepcopy(saved)
    for key, value in flatten(current).items():
        if _free(key):
            set_key(merged, key, copy.deepcopy(value), SHORTHAND)
    return merged


def load_config(path: str | Path, overrides=()) -> RunConfig:
    """Read `path` (YAML), apply `key=value` overrides (values parsed as YAML), check."""
    return load(RunConfig, read_yaml(path, overrides, SHORTHAND))
