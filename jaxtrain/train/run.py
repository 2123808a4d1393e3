"""A training run from a checked config (see `config.py`): what `jaxtrain train` does."""

from __future__ import annotations

from pathlib import Path

import jax

from .. import sharding
from ..data import registry as data_registry
from ..models import registry as model_registry
from .config import build_optimizer, model_kwargs
from .state import TrainState, param_logical_axes
from .tasks import get_task
from .trainer import Trainer


def data_and_model(cfg: dict) -> tuple[dict, str, dict]:
    """The config's data set, and its model's registry name and keyword arguments (with
    what the data's `info` knows, e.g. `num_classes`, filled in)."""
    data_cfg = dict(cfg["data"])
    data = data_registry.load(data_cfg.pop("name"), **data_cfg)
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    return data, name, model_kwargs(name, model_cfg, data.get("info", {}))


def config_trainer(cfg: dict, state, model, task, model_config: dict, run: str = "train",
                   run_config: dict | None = None) -> Trainer:
    """A `Trainer` for `state` set up as the config's train, sharding, checkpoint, early
    stopping and logging sections say."""
    train, out, ckpt = cfg["train"], Path(cfg["out"]), cfg["checkpoint"]
    return Trainer(
        state, task.loss_fn, metric_fn=task.metric_fn,
        mesh=sharding.make_mesh(**cfg["sharding"]["mesh"]),
        rules=cfg["sharding"]["preset"], logical_axes=param_logical_axes(model),
        batch_size=train["batch_size"], seed=cfg["seed"], precision=train["precision"],
        microbatches=train["microbatches"], steps_per_call=train["steps_per_call"],
        nan_policy=train["nan_policy"], log_every=train["log_every"], log_dir=out,
        tensorboard=cfg["logging"]["tensorboard"], plots=cfg["logging"]["plots"],
        progress=cfg["logging"]["progress"], run=run,
        checkpoint_dir=ckpt["dir"] or out / "checkpoints", checkpoint_every=ckpt["every"],
        checkpoint_best=ckpt["best"], checkpoint_at_end=ckpt["at_end"],
        max_to_keep=ckpt["max_to_keep"], async_checkpoint=ckpt["async"],
        model_config=model_config, run_config=run_config or cfg, monitor=task.monitor,
        mode=task.mode, early_stopping=cfg["early_stopping"],
        eval_batch_size=train["eval_batch_size"],
    )


def fit_summary(trainer: Trainer, state, out) -> dict:
    """What a config run reports: final step, last train and eval metrics, whether a
    signal or a callback stopped it, the output folder."""
    return {
        "step": int(state.step),
        "train": trainer.history[-1][1] if trainer.history else {},
        "eval": trainer.last_eval or {},
        "interrupted": trainer.interrupted,
        "stopped": trainer.stop_reason,
        "out": str(out),
    }


def run_config(cfg: dict) -> dict:
    """Train as `cfg` says; returns a summary (final step, last train and eval metrics,
    the task's end-of-run text, whether a signal interrupted the run)."""
    seed, train = cfg["seed"], cfg["train"]
    task = get_task(cfg["task"])
    data, name, kwargs = data_and_model(cfg)
    model = model_registry.build(name, seed, **kwargs)
    tx = build_optimizer(cfg["optimizer"])
    state = TrainState.create(model, tx, jax.random.PRNGKey(seed), ema_decay=train["ema_decay"])
    trainer = config_trainer(cfg, state, model, task, {"name": name, **kwargs})
    state = trainer.fit(data["train"], train["steps"], eval_data=data.get("valid"),
                        eval_every=train["eval_every"])
    summary = fit_summary(trainer, state, cfg["out"])
    if task.after_fit is not None and trainer.interrupted is None:
        summary["after_fit"] = task.after_fit(state.model(train=False), data)
    return summary
