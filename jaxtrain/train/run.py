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


def run_config(cfg: dict) -> dict:
    """Train as `cfg` says; returns a summary (final step, last train and eval metrics,
    the task's end-of-run text, whether a signal interrupted the run)."""
    seed, train, out = cfg["seed"], cfg["train"], Path(cfg["out"])
    task = get_task(cfg["task"])
    data_cfg = dict(cfg["data"])
    data = data_registry.load(data_cfg.pop("name"), **data_cfg)
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    kwargs = model_kwargs(name, model_cfg, data.get("info", {}))
    model = model_registry.build(name, seed, **kwargs)
    tx = build_optimizer(cfg["optimizer"])
    mesh = sharding.make_mesh(**cfg["sharding"]["mesh"])
    state = TrainState.create(model, tx, jax.random.PRNGKey(seed), ema_decay=train["ema_decay"])
    ckpt = cfg["checkpoint"]
    trainer = Trainer(
        state, task.loss_fn, metric_fn=task.metric_fn, mesh=mesh,
        rules=cfg["sharding"]["preset"], logical_axes=param_logical_axes(model),
        batch_size=train["batch_size"], seed=seed, precision=train["precision"],
        microbatches=train["microbatches"], steps_per_call=train["steps_per_call"],
        nan_policy=train["nan_policy"], log_every=train["log_every"], log_dir=out,
        tensorboard=cfg["logging"]["tensorboard"], plots=cfg["logging"]["plots"],
        progress=cfg["logging"]["progress"], checkpoint_dir=ckpt["dir"] or out / "checkpoints",
        checkpoint_every=ckpt["every"], checkpoint_best=ckpt["best"],
        checkpoint_at_end=ckpt["at_end"], max_to_keep=ckpt["max_to_keep"],
        async_checkpoint=ckpt["async"], model_config={"name": name, **kwargs},
        run_config=cfg, monitor=task.monitor, mode=task.mode,
        early_stopping=cfg["early_stopping"], eval_batch_size=train["eval_batch_size"],
    )
    eval_data = data.get("valid")
    state = trainer.fit(data["train"], train["steps"], eval_data=eval_data,
                        eval_every=train["eval_every"])
    summary = {
        "step": int(state.step),
        "train": trainer.history[-1][1] if trainer.history else {},
        "eval": trainer.last_eval or {},
        "interrupted": trainer.interrupted,
        "stopped": trainer.stop_reason,
        "out": str(out),
    }
    if task.after_fit is not None and trainer.interrupted is None:
        summary["after_fit"] = task.after_fit(state.model(train=False), data)
    return summary
