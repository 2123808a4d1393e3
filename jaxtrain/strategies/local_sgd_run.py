"""Local SGD / DiLoCo from a run config: rounds of `sync_every` inner steps on every
replica of the mesh's `data` axis, one outer step per round (`make_local_sgd_round`).

The batches of inner step t of the round that starts at step s are the global batches of
data positions s..s+H-1 (the Trainer's `Batches`: a dict of arrays or prepared records),
split over the replicas. The whole `LocalSGDState` (global params, outer optimizer state,
every replica's params and inner optimizer state) is checkpointed between rounds with
Orbax, with the identity of prepared records and early stopping's progress, so a stopped
run resumed from its folder ends bit for bit where an uninterrupted one does.

The loop reports as the Trainer does (`RunLogs`: log.jsonl, TensorBoard, progress,
curves.png) at round ends: logs, evaluations (`train.eval_every`), early stopping and
checkpoints (`checkpoint.every`) happen at the end of the round in which the step count
reaches a multiple of their period, and at the end. Keys that cannot apply to a round are
refused in one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import sharding
from ..checkpoint import Manager, model_signature
from ..config import to_dict
from ..data import eval_batches
from ..data.records import check_same_data
from ..errors import JaxtrainError
from ..train.callbacks import EarlyStopping, crossed
from ..train.feeds import Batches
from ..train.metrics import summarize_eval
from ..train.run_logs import RunLogs
from ..train.signals import StopSignals
from ..train.step import make_eval_step
from ..transforms.spec import build
from .local_sgd import LocalSGDState, make_local_sgd_round, state_shardings


def _outer(spec: dict):
    try:
        return build(spec)
    except JaxtrainError as err:
        raise JaxtrainError(f"config key 'local_sgd.outer': {err}") from None


def _refuse(cfg) -> None:
    """Refuse in one line what a round of local SGD cannot do."""
    train = cfg.train
    refused = {
        "privacy": (cfg.privacy is not None, "cannot be combined with local_sgd"),
        "logging.mlflow": (cfg.logging.mlflow is not None, "is not supported with local_sgd "
                           "(its loop writes log.jsonl, TensorBoard and curves.png only)"),
        "logging.wandb": (cfg.logging.wandb is not None, "is not supported with local_sgd "
                          "(its loop writes log.jsonl, TensorBoard and curves.png only)"),
        "train.ema_decay": (train.ema_decay is not None, "is not supported with local_sgd"),
        "train.microbatches": (train.microbatches != 1, "must be 1 with local_sgd"),
        "train.steps_per_call": (train.steps_per_call != 1, "must be 1 with local_sgd (a "
                                 "round is one call of sync_every steps)"),
        "train.precision": (train.precision not in ("auto", "float32"), "must be float32 "
                            "with local_sgd (its rounds compute in the params' float32)"),
        "train.nan_policy": (train.nan_policy == "skip", "skip is not supported with "
                             "local_sgd (a round cannot skip one of its steps): use raise"),
        "checkpoint.best": (cfg.checkpoint.best, "is not supported with local_sgd (it "
                            "saves every checkpoint.every steps and at the end)"),
        "data.augment": ("augment" in cfg.data, "is not supported with local_sgd"),
        "optimizer.reduce_on_plateau": ("reduce_on_plateau" in cfg.optimizer,
                                        "is not supported with local_sgd"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise JaxtrainError(f"config key {key!r} {why}")


def _check(section, train, replicas: int) -> None:
    h = section.sync_every
    if train.steps % h:
        raise JaxtrainError(f"config key 'train.steps' ({train.steps}) must be a multiple of "
                            f"local_sgd.sync_every ({h}): a round is {h} steps")
    if train.batch_size % replicas:
        raise JaxtrainError(f"config key 'train.batch_size' ({train.batch_size}) must split "
                            f"over the {replicas} local SGD replicas (the mesh's data axis)")


class _Loop:
    """What early stopping reads of a loop (as of a `Trainer`): the task's monitored
    metric, and `stop`."""

    def __init__(self, monitor: str, mode: str):
        self.monitor, self.mode, self.stop_reason = monitor, mode, None

    def stop(self, reason: str) -> None:
        self.stop_reason = reason


def run_local_sgd(cfg, state, task, data: dict, model_config: dict, folder: Path,
                  mesh) -> dict:
    """Train `state` (a fresh `TrainState`: its optimizer is the inner one) by local SGD as
    the config's `local_sgd` section says, resuming from `folder`'s latest checkpoint;
    returns the run's summary (final step, last logged round's mean loss, the last
    held-out metrics, what stopped it)."""
    _refuse(cfg)
    section, train, ckpt = cfg.local_sgd, cfg.train, cfg.checkpoint
    if train.compilation_cache is not None:  # as the Trainer does
        sharding.use_compilation_cache(train.compilation_cache)
    _check(section, train, mesh.shape["data"])
    h = section.sync_every
    local = LocalSGDState.create(state, _outer(section.outer), mesh.shape["data"])
    local = jax.device_put(local, state_shardings(local, mesh))
    signature = model_signature(model_config, state.params)
    round_fn = make_local_sgd_round(task.loss_fn, mesh, h)
    batches = Batches(data["train"], train.batch_size, cfg.seed)
    rows = sharding.local_batch_rows(mesh, train.batch_size)
    stacked = NamedSharding(mesh, PartitionSpec(None, "data"))
    identity = getattr(data["train"], "identity", None)  # of prepared records
    evaluate = None if data.get("valid") is None else _evaluator(
        state, task, data["valid"], train.eval_batch_size)
    loop, stopping = _Loop(task.monitor, task.mode), None
    if cfg.early_stopping is not None:  # the summary, not a state, is returned: no restore
        stopping = EarlyStopping(**to_dict(cfg.early_stopping), restore_best=False)
        stopping.on_fit_start(loop, None)
    record, signals, logs, arrays, stop = {}, StopSignals(), None, {}, None
    with Manager(folder, max_to_keep=ckpt.max_to_keep, async_save=ckpt.async_) as mngr:
        if mngr.steps():
            local = mngr.restore(local, signature)
            meta = mngr.meta(mngr.restored_step)
            check_same_data(meta.get("data"), identity, folder)
            record = meta.get("record") or {}
        if stopping is not None and record.get("early_stopping") is not None:
            stopping.load(record["early_stopping"], None)
            if stopping.exhausted():
                loop.stop(stopping.reason())
        last, last_eval = record.get("last_train") or {}, record.get("last_eval")
        step = int(local.step)
        logs = RunLogs(cfg.out, "train", step, train.steps,
                       tensorboard=cfg.logging.tensorboard, plots=cfg.logging.plots,
                       progress=cfg.logging.progress, main=sharding.is_main_process())
        signals.install()  # SIGTERM/SIGINT: save after this round and end
        try:
            while step < train.steps and loop.stop_reason is None:
                share = batches.get(step, h, rows)
                local, losses = round_fn(local, sharding.from_shares(
                    share, stacked, train.batch_size, axis=1))
                before, step = step, step + h
                last = {"loss": float(np.mean(jax.device_get(losses)))}
                if not math.isfinite(last["loss"]) and train.nan_policy == "raise":
                    raise JaxtrainError(f"non-finite loss in the local SGD round ending at "
                                        f"step {step} (no checkpoint was written from it on)")
                end = step == train.steps
                if crossed(before, step, train.log_every) or end:
                    logs.write("train", step, last)
                    logs.progress(step, last)
                if evaluate is not None and (crossed(before, step, train.eval_every) or end):
                    last_eval, arrays = evaluate(local)
                    logs.write("train/eval", step, last_eval)
                    if stopping is not None:
                        stopping.on_eval(loop, step, last_eval, None)
                stop = signals.agreed(True)  # each round already waits for its losses
                end = end or stop is not None or loop.stop_reason is not None
                if crossed(before, step, ckpt.every) or (end and (ckpt.at_end or stop)):
                    record = {"last_train": last, "last_eval": last_eval,
                              "early_stopping": None if stopping is None
                              else stopping.record()[0]}
                    mngr.save(step, local, signature, config=to_dict(cfg), data=identity,
                              record=record)
                if stop is not None:
                    break
        finally:
            signals.restore()
            logs.close(arrays.get("confusion"), f"train: step {step}")
        mngr.wait()
    summary = {"step": step, "train": last, "eval": last_eval or {}, "out": str(cfg.out),
               "interrupted": stop, "stopped": loop.stop_reason}
    if task.after_fit is not None and stop is None:
        summary["after_fit"] = task.after_fit(local.model(), data)
    return summary


def _evaluator(state, task, valid: dict, batch_size: int):
    """`local -> (metrics, arrays)`: the task's held-out metrics of the global params (on
    one device), compiled once."""
    step = jax.jit(make_eval_step(task.metric_fn))
    size = min(batch_size, len(next(iter(valid.values()))))

    def evaluate(local: LocalSGDState):
        evaluated = state.replace(params=jax.device_get(local.params),
                                  model_state=jax.device_get(local.model_state),
                                  ema_params=None)
        totals: dict = {}
        for batch in eval_batches(valid, size):
            for k, v in jax.device_get(step(evaluated, batch)).items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        metrics, arrays = summarize_eval(task.metric_fn, totals)
        return {k: v for k, v in metrics.items() if math.isfinite(v)}, arrays

    return evaluate
