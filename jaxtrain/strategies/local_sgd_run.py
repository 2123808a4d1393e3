"""Local SGD / DiLoCo from a run config: rounds of `sync_every` inner steps on every
replica of the mesh's `data` axis, one outer step per round (`make_local_sgd_round`).

The batches of inner step t of the round that starts at step s are the global batches of
data positions s..s+H-1 (`batch_at`), split over the replicas. The whole `LocalSGDState`
(global params, outer optimizer state, every replica's params and inner optimizer state)
is checkpointed between rounds with Orbax, so a stopped run resumed from its folder ends
bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from .. import sharding
from ..checkpoint import Manager, model_signature
from ..config import to_dict
from ..data import batch_at, eval_batches
from ..errors import JaxtrainError
from ..train.logs import JsonlLogger, keep_until
from ..train.metrics import summarize_eval
from ..train.signals import StopSignals
from ..train.step import make_eval_step
from ..transforms.spec import build
from .local_sgd import LocalSGDState, make_local_sgd_round, state_shardings


def _outer(spec: dict):
    try:
        return build(spec)
    except JaxtrainError as err:
        raise JaxtrainError(f"config key 'local_sgd.outer': {err}") from None


def _check(section, train, replicas: int) -> int:
    """The number of rounds of a run of `train.steps` steps."""
    h = section.sync_every
    if train.steps % h:
        raise JaxtrainError(f"config key 'train.steps' ({train.steps}) must be a multiple of "
                            f"local_sgd.sync_every ({h}): a round is {h} steps")
    if train.batch_size % replicas:
        raise JaxtrainError(f"config key 'train.batch_size' ({train.batch_size}) must split "
                            f"over the {replicas} local SGD replicas (the mesh's data axis)")
    if train.ema_decay is not None:
        raise JaxtrainError("config key 'train.ema_decay' is not supported with local_sgd")
    for key in ("microbatches", "steps_per_call"):
        if getattr(train, key) != 1:
            raise JaxtrainError(f"config key 'train.{key}' must be 1 with local_sgd")
    return train.steps // h


def run_local_sgd(cfg, state, task, data: dict, model_config: dict, folder: Path,
                  mesh) -> dict:
    """Train `state` (a fresh `TrainState`: its optimizer is the inner one) by local SGD as
    the config's `local_sgd` section says, resuming from `folder`'s latest checkpoint;
    returns the run's summary (final step, last round's mean loss, held-out metrics)."""
    section, train = cfg.local_sgd, cfg.train
    if cfg.privacy is not None:
        raise JaxtrainError("config keys 'local_sgd' and 'privacy' cannot be combined")
    for tracker in ("mlflow", "wandb"):
        if getattr(cfg.logging, tracker) is not None:
            raise JaxtrainError(f"config key 'logging.{tracker}' is not supported with "
                                "local_sgd (its loop writes log.jsonl only)")
    if not isinstance(data["train"], dict):
        raise JaxtrainError("config key 'local_sgd': needs a data set held in memory")
    replicas = mesh.shape["data"]
    rounds = _check(section, train, replicas)
    h = section.sync_every
    local = LocalSGDState.create(state, _outer(section.outer), replicas)
    local = jax.device_put(local, state_shardings(local, mesh))
    signature = model_signature(model_config, state.params)
    ckpt = cfg.checkpoint
    every = None if ckpt.every is None else max(1, ckpt.every // h)  # in rounds
    round_fn = make_local_sgd_round(task.loss_fn, mesh, h)
    stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    out, last, logger, signals = Path(cfg.out), {}, None, StopSignals()
    with Manager(folder, max_to_keep=ckpt.max_to_keep, async_save=ckpt.async_) as mngr:
        if mngr.steps():
            local = mngr.restore(local, signature)
        start = int(local.step) // h
        if sharding.is_main_process():  # steps after the checkpoint are logged again
            out.mkdir(parents=True, exist_ok=True)
            keep_until(out / "log.jsonl", {"train", "train/eval"}, int(local.step))
            logger = JsonlLogger(out / "log.jsonl")
        signals.install()  # SIGTERM/SIGINT: save after this round and end
        try:
            for r in range(start, rounds):
                s = r * h
                batches = [batch_at(data["train"], train.batch_size, cfg.seed, s + t)
                           for t in range(h)]
                batches = jax.device_put(jax.tree.map(lambda *x: np.stack(x), *batches),
                                         stacked)
                local, losses = round_fn(local, batches)
                last = {"loss": float(np.mean(jax.device_get(losses)))}
                if logger is not None and (r + 1) % max(1, train.log_every // h) == 0:
                    logger.log("train", s + h, last)
                end = r + 1 == rounds or signals.received is not None
                if (every and (r + 1) % every == 0) or (end and (ckpt.at_end or signals.received)):
                    mngr.save(s + h, local, signature, config=to_dict(cfg))
                if signals.received is not None:
                    break
        finally:
            signals.restore()
        mngr.wait()
    summary = {"step": int(local.step), "train": last, "out": str(out),
               "interrupted": signals.received, "stopped": None}
    if data.get("valid") is not None:
        summary["eval"] = _evaluate(state, local, task, data["valid"],
                                    train.eval_batch_size)
        if logger is not None:
            logger.log("train/eval", int(local.step), summary["eval"])
    if logger is not None:
        logger.close()
    return summary


def _evaluate(state, local: LocalSGDState, task, valid: dict, batch_size: int) -> dict:
    """The task's held-out metrics of the global params (on one device)."""
    params = jax.device_get(local.params)
    evaluated = state.replace(params=params, ema_params=None)
    step = jax.jit(make_eval_step(task.metric_fn))
    totals: dict = {}
    for batch in eval_batches(valid, min(batch_size, len(next(iter(valid.values()))))):
        for k, v in jax.device_get(step(evaluated, batch)).items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    metrics, _ = summarize_eval(task.metric_fn, totals)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
