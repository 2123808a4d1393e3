"""Callbacks of the `Trainer`: early stopping and checkpointing, and the protocol for more.

A callback's hooks run on the host between compiled calls. `on_step_end` runs after every
call, so it must not read device values (that would sync the hot path); `on_log` and
`on_eval` receive metrics already on the host; `on_eval` may return a new state (one
that carries the held-out value into the optimizer state, say), which the loop continues
from. `on_checkpoint` runs after each checkpoint the `Checkpointer` begins (every
process of a multi-process run reaches it at the same steps).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax

from ..checkpoint import Manager
from ..data.records import check_same_data
from ..errors import JaxtrainError
from ..transforms.plateau import observe_plateau
from .config import config_changes

MODES = ("min", "max")


def crossed(before: int, after: int, every: int | None) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return bool(every) and after // every > before // every


def better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` by more than `min_delta` in direction `mode`."""
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise JaxtrainError(f"unknown mode {mode!r} (valid: {', '.join(MODES)})")
    return mode


class Callback:
    def on_fit_start(self, trainer, state) -> None: ...

    def on_step_end(self, trainer, before: int, step: int, state) -> None: ...

    def on_log(self, trainer, step: int, metrics: dict) -> None: ...

    def on_eval(self, trainer, step: int, metrics: dict, state) -> None: ...

    def on_checkpoint(self, trainer, step: int, path: Path) -> None: ...

    def on_fit_end(self, trainer, state) -> None: ...


class PlateauOnEval(Callback):
    """Feed the held-out `monitor` of each evaluation to the optimizer's
    `reduce_on_plateau(monitor=...)`, which decides on it at the next step
    (`jaxtrain.transforms.plateau.observe_plateau`)."""

    def __init__(self, monitor: str):
        self.monitor = monitor

    def on_eval(self, trainer, step, metrics, state):
        if self.monitor not in metrics:
            raise JaxtrainError(f"optimizer.reduce_on_plateau.monitor is {self.monitor!r}, "
                                f"but evaluation gives only {', '.join(sorted(metrics))}")
        return state.replace(opt_state=observe_plateau(state.opt_state,
                                                       metrics[self.monitor]))


class EarlyStopping(Callback):
    """Stop when the held-out `monitor` has not improved by `min_delta` for `patience`
    evaluations; at the end the params (and model state, EMA) of the best one are restored.
    Its progress (best value, its step, evaluations waited, the best weights) is saved with
    each checkpoint, so a resumed run stops where an uninterrupted one would."""

    def __init__(self, monitor: str | None = None, mode: str | None = None, patience: int = 5,
                 min_delta: float = 0.0, restore_best: bool = True):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise JaxtrainError(f"early stopping patience must be a positive integer, got "
                                f"{patience!r}")
        self.monitor, self.mode = monitor, None if mode is None else check_mode(mode)
        self.patience, self.min_delta, self.restore_best = patience, min_delta, restore_best

    def on_fit_start(self, trainer, state) -> None:
        self.monitor = self.monitor or trainer.monitor
        self.mode = self.mode or trainer.mode
        self.best, self.best_step, self.best_arrays, self.waited = None, None, None, 0

    def on_eval(self, trainer, step, metrics, state) -> None:
        if self.monitor not in metrics:
            raise JaxtrainError(f"early stopping monitors {self.monitor!r}, but evaluation "
                                f"gives only {', '.join(sorted(metrics))}")
        value = metrics[self.monitor]
        if better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.waited = value, step, 0
            if self.restore_best:  # a host copy: the device state is donated to the next step
                self.best_arrays = jax.device_get(_weights(state))
        else:
            self.waited += 1
        if self.exhausted():
            trainer.stop(self.reason())

    def exhausted(self) -> bool:
        return self.waited >= self.patience

    def reason(self) -> str:
        return (f"early stopping: no improvement of {self.monitor} for {self.patience} "
                f"evaluations (best {self.best:.6g} at step {self.best_step})")

    def record(self) -> tuple[dict, dict | None]:
        """What a checkpoint keeps of the progress: JSON values and the best weights."""
        return ({"best": self.best, "best_step": self.best_step, "waited": self.waited},
                self.best_arrays)

    def load(self, record: dict, arrays: dict | None) -> None:
        """Continue from a checkpoint's `record()`."""
        self.best, self.best_step = record["best"], record["best_step"]
        self.waited = record["waited"]
        self.best_arrays = None if arrays is None else jax.device_get(arrays)

    def restore(self, state):
        """`state` with the best params put back (same placement)."""
        if self.best_arrays is None:
            return state
        current = _weights(state)
        placed = jax.device_put(self.best_arrays,
                                jax.tree.map(lambda x: x.sharding, current))
        return state.replace(**placed)


def _weights(state) -> dict:
    """The arrays early stopping keeps of its best evaluation (params, model state, EMA)."""
    weights = {"params": state.params, "model_state": state.model_state}
    if state.ema_params is not None:
        weights["ema_params"] = state.ema_params
    return weights


class Checkpointer(Callback):
    """Orbax checkpoints every `every` steps, on each new best evaluation, at the end.

    Each checkpoint carries the metrics of an evaluation at its step (Orbax keeps the best
    step by them across reopens) and the trainer's `resume_record` (best value, early
    stopping progress). Before a step is saved the pending log records are written, so a
    run killed after a save has logged every step up to it."""

    def __init__(self, directory, every: int | None = None, best: bool = False,
                 at_end: bool = True, max_to_keep: int | None = 3, async_save: bool = True,
                 monitor: str = "loss", mode: str = "min"):
        self.directory, self.every, self.best, self.at_end = directory, every, best, at_end
        self.max_to_keep, self.async_save = max_to_keep, async_save
        self.monitor, self.mode = monitor, mode
        self.manager = None
        self.resumed: tuple[dict, dict | None] | None = None
        self.latest: Path | None = None  # the newest step saved or restored from

    def open(self) -> Manager:
        if self.manager is None:
            # with `best`, the best step is kept beside the newest ones, never pruned
            self.manager = Manager(self.directory, max_to_keep=self.max_to_keep,
                                   async_save=self.async_save,
                                   best_metric=self.monitor if self.best else None,
                                   best_mode=self.mode)
        return self.manager

    def restore_latest(self, like, trainer):
        """The latest intact checkpoint restored onto `like`, or None when there is none.
        Refuses a checkpoint of a run with another config (see `config_changes`) or one
        trained on other prepared data behind the same path (see `identity_changes`)."""
        mngr = self.open()
        self.resumed = None
        if mngr.latest_step() is None:
            return None
        state = mngr.restore(like, trainer.signature)
        self.latest = mngr.directory / str(mngr.restored_step)
        meta = mngr.meta(mngr.restored_step)
        changes = config_changes(meta.get("config") or {}, trainer.run_config)
        if meta.get("config") and trainer.run_config and changes:
            self.close()
            raise JaxtrainError(
                f"checkpoint folder {self.directory} holds a run with other settings "
                f"({', '.join(changes)}); resume it with its saved config or use another "
                "folder")
        try:
            check_same_data(meta.get("data"), trainer.data_identity, self.directory)
        except JaxtrainError:
            self.close()
            raise
        record = meta.get("record") or {}
        extra = None
        if record.get("early_stopping") is not None and trainer.early_stopping is not None:
            extra = mngr.restore_extra(mngr.restored_step, _weights(state))
        self.resumed = (record, extra)
        return state

    def on_fit_start(self, trainer, state) -> None:
        if self.resumed is not None:
            trainer.load_resume_record(*self.resumed)

    def save(self, trainer, step: int, state, metrics: dict | None = None) -> None:
        trainer.flush_logs()  # every record up to `step` is in the log before `step` is saved
        trainer.check_finite(state)  # a non-finite state never overwrites a good checkpoint
        mngr = self.open()
        self.latest = mngr.directory / str(step)
        if step in mngr.steps():
            return
        if metrics is None and trainer.eval_history and trainer.eval_history[-1][0] == step:
            metrics = trainer.eval_history[-1][1]
        record, extra = trainer.resume_record()
        mngr.save(step, state, trainer.signature, metrics=metrics, config=trainer.run_config,
                  data=trainer.data_identity, record=record, extra=extra)
        for cb in trainer.callbacks:  # the save may still be written (async): see wait()
            if cb is not self:
                cb.on_checkpoint(trainer, step, self.latest)

    def wait(self) -> None:
        """Block until the checkpoints begun so far are written and committed."""
        if self.manager is not None:
            self.manager.wait()

    def on_step_end(self, trainer, before, step, state) -> None:
        if crossed(before, step, self.every):
            self.save(trainer, step, state)

    def on_eval(self, trainer, step, metrics, state) -> None:
        if self.best and trainer.improved:
            self.save(trainer, step, state, metrics)

    def on_fit_end(self, trainer, state) -> None:
        if self.at_end or trainer.interrupted:
            self.save(trainer, trainer.step, state)
        self.close()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait()
            self.manager.close()
            self.manager = None
