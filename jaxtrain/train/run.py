"""A training run from a checked config (see `config.py`): what `jaxtrain train` does."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import sys
import tempfile
from pathlib import Path

import jax
from flax import nnx

from .. import sharding
from ..checkpoint import Manager
from ..config import load, to_dict
from ..data import registry as data_registry
from ..data.augment import check_augment, with_augmentation
from ..data.records import closing
from ..errors import JaxtrainError
from ..models import registry as model_registry
from ..strategies.distill import make_distill_loss, teacher_from_checkpoint, with_transfer_set
from ..strategies.local_sgd_run import run_local_sgd
from ..strategies.privacy import dp_epsilon, dp_from_config, make_dp_train_step
from ..transforms.paths import matches, path_list
from ..transforms.spec import build as build_spec
from .callbacks import PlateauOnEval
from .config import (
    RunConfig,
    TrainerConfig,
    TrainerSections,
    config_changes,
    with_rerun_free,
)
from .state import TrainState
from .tasks import get_task
from .trainer import Trainer


def data_and_model(cfg: RunConfig) -> tuple[dict, str, dict]:
    """The config's data set, and its model's registry name and keyword arguments (with
    what the data's `info` knows, e.g. `num_classes`, filled in)."""
    data_cfg = dict(cfg.data)
    augment = data_cfg.pop("augment", None)
    data = data_registry.load(data_cfg.pop("name"), **data_cfg)
    classes = data.get("info", {}).get("num_classes")
    if cfg.task == "classification" and classes is not None and classes < 2:
        raise JaxtrainError(f"config key 'data': classification needs two or more classes, "
                            f"the data has {classes} (a one-class run reaches accuracy 1.0 "
                            f"learning nothing)")
    check_augment(augment, data.get("info", {}))
    model_cfg = dict(cfg.model)
    name = model_cfg.pop("name")
    return data, name, model_kwargs(name, model_cfg, data.get("info", {}))


def model_kwargs(name: str, kwargs: dict, info: dict) -> dict:
    """`kwargs` plus what the data's `info` fixes that the model's constructor takes, under
    the model's name for it (`DATA_ARGS`: the MLP's head is `out_features`). A size the
    config also gives must agree with the data's: a head of another width than the
    number of classes (or targets), an input width other than the data's features, or a
    vocabulary smaller than the data's is refused in one line naming both numbers."""
    cls = model_registry.MODELS.get(name)
    if cls is None:
        return kwargs
    accepted = inspect.signature(cls.__init__).parameters
    renamed = getattr(cls, "DATA_ARGS", {})
    filled = {}
    for key, value in info.items():
        arg = renamed.get(key, key)
        if arg not in accepted:
            continue
        if arg in kwargs:
            _check_agrees(name, arg, kwargs[arg], key, value)
        else:
            filled[arg] = value
    return {**filled, **kwargs}


def _check_agrees(model: str, arg: str, given, key: str, value) -> None:
    """Refuse a model size the config gives that the data contradicts (see model_kwargs)."""
    if key == "vocab_size":  # a larger vocabulary (padded for speed) is fine
        if isinstance(given, int) and given < value:
            raise JaxtrainError(f"config key 'model.vocab_size' is {given} but the data's "
                                f"tokens go up to {value - 1}: set it to at least {value}")
        return
    if key not in ("num_classes", "targets", "features"):
        return
    size = math.prod(given) if isinstance(given, list | tuple) else given
    if size != value:
        what = {"num_classes": "classes", "targets": "targets", "features": "features"}[key]
        raise JaxtrainError(f"config key 'model.{arg}' is {given!r} but the data has {value} "
                            f"{what}: leave it out (model {model!r} takes the data's) or set "
                            f"it to {value}")


def checkpoint_folder(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.out) / "checkpoints")


def saved_config(folder: Path) -> dict | None:
    """The run config recorded with the newest readable checkpoint in `folder`, or None
    when it holds none."""
    if not folder.exists():
        return None
    with Manager(folder, read_only=True) as mngr:
        for step in reversed(mngr.steps()):
            try:
                return mngr.meta(step).get("config") or None
            except Exception:  # a damaged record: the restore will skip this step too
                continue
    return None


def _writable(folder: Path) -> bool:
    """Whether a file can be made in `folder`: tried with a probe file, removed at once
    (`os.access` says yes to root on a read-only or pseudo file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxtrain-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def rerun_config(cfg: RunConfig, resume: bool = False, flag: str = "--resume") -> RunConfig:
    """The config to run when `cfg`'s output folder may already hold checkpoints.

    No checkpoint: `cfg`. A checkpoint of the same config (up to `RERUN_FREE` keys such
    as `train.steps`): `cfg`, resumed. Of another config: refused in one line naming the
    keys that differ, unless `resume`, which continues with the saved config (and the
    rerun-free keys of `cfg`). Nothing is read but the records; nothing is kept (an
    `out` that cannot be made, tried with a probe file, is refused in one line)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise JaxtrainError(f"config key 'out': {out} is a file, not a folder")
    existing = out  # the first write would fail later, with a traceback
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not _writable(existing):
        raise JaxtrainError(f"config key 'out': cannot create the folder {out}: {existing} "
                            f"is {'not writable' if existing.is_dir() else 'not a folder'}")
    folder = checkpoint_folder(cfg)
    saved = saved_config(folder)
    if saved is None:
        if resume:
            raise JaxtrainError(f"{flag}: no checkpoint in {folder} to resume")
        return cfg
    changes = config_changes(saved, to_dict(cfg))
    if not changes:
        return cfg
    if not resume:
        raise JaxtrainError(
            f"{folder} holds a run with other settings ({'; '.join(changes)}); continue it "
            f"as saved with {flag}, or set another out= for a new run")
    print(f"{flag}: continuing the run in {folder} with its saved settings (ignoring "
          f"{'; '.join(changes)})", file=sys.stderr)
    return load(type(cfg), with_rerun_free(saved, to_dict(cfg)))


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def config_patterns(cfg: RunConfig) -> dict[str, list[str]]:
    """The param path patterns of a config (`optimizer.freeze`, `optimizer.groups`,
    `optimizer.weight_decay.include/exclude`), by config key."""
    spec = cfg.optimizer
    found = {"optimizer.freeze": _as_list(spec.get("freeze")),
             "optimizer.groups": list(spec.get("groups") or {})}
    decay = spec.get("weight_decay")
    if isinstance(decay, dict):
        for key in ("include", "exclude"):
            found[f"optimizer.weight_decay.{key}"] = _as_list(decay.get(key))
    return found


def check_patterns(patterns: dict[str, list[str]], paths: list[str]) -> None:
    """Refuse a pattern that selects none of `paths`, naming it and the closest paths (a
    misspelt freeze or group would otherwise train as if it were not there)."""
    for key, values in patterns.items():
        for pattern in values:
            if not isinstance(pattern, str):
                raise JaxtrainError(f"config key {key!r}: patterns are strings (globs or "
                                    f"re:regexes), got {pattern!r}")
            if any(matches(path, pattern) for path in paths):
                continue
            plain = pattern[3:] if pattern.startswith("re:") else pattern.replace("*", "")
            close = difflib.get_close_matches(plain, paths, n=3, cutoff=0.0)
            raise JaxtrainError(f"config key {key!r}: pattern {pattern!r} matches no "
                                f"parameter (closest: {', '.join(close)})")


def config_trainer(cfg: RunConfig, state, model, task, model_config: dict,
                   run: str = "train", callbacks=()) -> Trainer:
    """A `Trainer` for `state` set up as the config's train, sharding, checkpoint, early
    stopping and logging sections say (and the task's loss on augmented images where
    `data.augment` asks for it), with `callbacks` besides the config's."""
    train, out, ckpt = cfg.train, Path(cfg.out), cfg.checkpoint
    loss_fn = with_augmentation(task.loss_fn, cfg.data.get("augment"))
    plateau = cfg.optimizer.get("reduce_on_plateau")
    monitor = plateau.get("monitor") if isinstance(plateau, dict) else None
    if monitor is not None and train.eval_every is None:
        raise JaxtrainError(f"config key 'optimizer.reduce_on_plateau.monitor' watches the "
                            f"held-out {monitor!r}: set train.eval_every too")
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainerSections)}
    sections["checkpoint"] = dataclasses.replace(ckpt, dir=str(checkpoint_folder(cfg)))
    config = TrainerConfig(**sections, log_dir=str(out), monitor=task.monitor, mode=task.mode,
                           run=run, model_config=model_config, run_config=to_dict(cfg))
    return Trainer(state, loss_fn, config, metric_fn=task.metric_fn,
                   callbacks=[*([] if monitor is None else [PlateauOnEval(monitor)]),
                              *callbacks],
                   train_step=None if cfg.privacy is None
                   else make_dp_train_step(loss_fn, train.nan_policy))


def distill_setup(cfg: RunConfig, task, data: dict):
    """The task with the distillation loss, and the data with its `labelled` column and
    the transfer set (the `distill` section)."""
    section = cfg.distill
    if cfg.task != "classification":
        raise JaxtrainError(f"config key 'distill' needs task classification, got "
                            f"{cfg.task!r}")
    teacher = teacher_from_checkpoint(section.teacher, section.step, cfg.seed)
    transfer = None
    if section.transfer is not None:
        spec = dict(section.transfer)
        transfer = data_registry.load(spec.pop("name"), "distill.transfer", **spec)["train"]
    train = with_transfer_set(data["train"], transfer, section.labelled, cfg.seed)
    loss = make_distill_loss(teacher, section.temperature, section.alpha)
    return dataclasses.replace(task, loss_fn=loss), {**data, "train": train}


def fit_summary(trainer: Trainer, state, out) -> dict:
    """What a config run reports: final step, last train and eval metrics (and the eval's
    per-class values and confusion matrix as lists, where the task gives them), whether a
    signal or a callback stopped it, the output folder."""
    return {
        "step": int(state.step),
        "train": trainer.last_train or {},
        "eval": trainer.last_eval or {},
        **({"eval_arrays": {k: v.tolist() for k, v in trainer.last_eval_arrays.items()}}
           if trainer.last_eval_arrays else {}),
        "interrupted": trainer.interrupted,
        "stopped": trainer.stop_reason,
        "out": str(out),
    }


def run_config(cfg: RunConfig, resume: bool = False, callbacks=()) -> dict:
    """Train as `cfg` says (see `rerun_config` for a folder that holds a run already, and
    `resume`); returns a summary (final step, last train and eval metrics, the task's
    end-of-run text, whether a signal interrupted the run). `callbacks` are the
    `Trainer`'s besides the config's (a `local_sgd` run, which has its own loop, takes
    none)."""
    cfg = rerun_config(cfg, resume)
    if cfg.train.compilation_cache is not None:  # from the start: the model's init compiles
        sharding.use_compilation_cache(cfg.train.compilation_cache)
    task = get_task(cfg.task)
    data, name, kwargs = data_and_model(cfg)
    with closing(data):  # the records' worker processes end with the run, however it ends
        seed, train = cfg.seed, cfg.train
        if cfg.distill is not None:
            task, data = distill_setup(cfg, task, data)
        model = model_registry.build(name, seed, **kwargs)
        mesh = sharding.make_mesh(**to_dict(cfg.sharding.mesh))
        # Shampoo's and SOAP's per-block state is padded to split evenly over the mesh.
        tx = build_spec(cfg.optimizer, "config key 'optimizer': ", num_devices=mesh.size)
        train_data, privacy = data["train"], cfg.privacy
        if privacy is not None:  # DP-SGD on Poisson batches of expected size train.batch_size
            tx, train_data, rate = dp_from_config(privacy, tx, train_data, train,
                                                  seed, sharding.batch_parallelism(mesh))
        check_patterns(config_patterns(cfg), path_list(nnx.to_pure_dict(nnx.state(model,
                                                                                nnx.Param))))
        state = TrainState.create(model, tx, jax.random.PRNGKey(seed), ema_decay=train.ema_decay)
        if cfg.local_sgd is not None:  # its own loop: replicas with their own params
            if callbacks:
                raise JaxtrainError("config key 'local_sgd': its rounds run their own loop, "
                                    "which takes no Trainer callbacks (nor Ray's reports)")
            return run_local_sgd(cfg, state, task, data, {"name": name, **kwargs},
                                 checkpoint_folder(cfg), mesh)
        trainer = config_trainer(cfg, state, model, task, {"name": name, **kwargs},
                                 callbacks=callbacks)
        state = trainer.fit(train_data, train.steps, eval_data=data.get("valid"),
                            eval_every=train.eval_every)
        summary = fit_summary(trainer, state, cfg.out)
        if privacy is not None:  # what the accountant says of the steps taken, all resumes in
            summary["privacy"] = {"epsilon": dp_epsilon(
                privacy.noise_multiplier, rate, int(state.step), privacy.delta,
                privacy.accountant), "delta": privacy.delta, "sampling_rate": rate}
        if task.after_fit is not None and trainer.interrupted is None:
            summary["after_fit"] = task.after_fit(state.model(train=False), data)
        return summary
