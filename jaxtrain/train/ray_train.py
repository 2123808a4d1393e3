"""`jaxtrain train` under Ray Train: the same run as the per-worker function of a
`JaxTrainer` (`ray.train.v2.jax`), for users whose cluster is a Ray cluster.

`train_on_ray(config, num_workers=N)` (the CLI's `jaxtrain train CONFIG --ray-workers N`)
checks the config on the driver, then starts N Ray Train workers; each one runs
`run_config` as `jaxtrain train` would, as one process of an N-process JAX job:

- **jax.distributed**: Ray's `JaxConfig` starts it itself only for TPU and GPU workers.
  On CPU workers, rank 0 picks its node's address and a free port, Ray's
  `broadcast_from_rank_zero` hands it to the others (world rank and size from
  `ray.train.get_context()`), and every worker joins with `sharding.initialize`;
- **metrics and checkpoints**: after every checkpoint jaxtrain saves (`checkpoint.every`,
  the best, the end) every worker waits for the save to be committed and calls
  `ray.train.report` with the step's training and last held-out metrics (held-out ones as
  `eval/NAME`); rank 0 passes the Orbax step folder as the `ray.train.Checkpoint`. The
  run's Ray storage is the checkpoint folder's parent (the run's `out` by default), so
  Ray registers the folder where Orbax wrote it, without a copy
  (`CheckpointUploadMode.NO_UPLOAD`). `report` is a barrier across the workers: the
  saves, which all processes take part in, are the points every worker reaches;
- **failures**: with `max_failures` (Ray's `FailureConfig`) Ray restarts the whole worker
  group after a worker dies; the restarted workers resume from the latest complete
  checkpoint in the run's folder, which is never older than the last one registered
  with Ray, and continue with the same data order.

The run's folders must be on storage every worker sees (a shared filesystem), as for any
multi-process run; `out` and `checkpoint.dir` are made absolute on the driver (Ray's
workers run in a folder of their own). Ray is an optional dependency:
`pip install "jaxtrain[ray]"`.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from .. import sharding
from ..config import load, to_dict
from ..errors import JaxtrainError
from ..sharding.distributed import HEARTBEAT_TIMEOUT
from .callbacks import Callback
from .config import RunConfig, load_config


def train_on_ray(config, overrides=(), *, num_workers: int, use_gpu: bool = False,
                 max_failures: int = 0, resume: bool = False, callbacks=(),
                 coordinator_timeout: float = 300.0,
                 heartbeat_timeout: int = HEARTBEAT_TIMEOUT):
    """Run the config (a YAML path, with `key=value` `overrides`) on `num_workers` Ray
    Train workers of the Ray cluster `ray.init()` finds (`RAY_ADDRESS`, else a local one,
    unless this process already joined one). `use_gpu`: one GPU per worker (Ray then starts
    `jax.distributed`). `max_failures`: how often Ray restarts the worker group after a
    failure (-1: without limit). `callbacks`: more `Trainer` callbacks, run in every
    worker (picklable). The workers' environment (`XLA_FLAGS`, say) is Ray's: a local
    cluster inherits this process's, else give `ray.init(runtime_env={"env_vars": ...})`.
    Returns Ray's `Result` (`metrics`: the last report; `checkpoint`: the last registered
    step folder)."""
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise JaxtrainError(f"--ray-workers must be a positive integer, got {num_workers!r}")
    if not isinstance(max_failures, int) or max_failures < -1:
        raise JaxtrainError(f"--ray-max-failures must be an integer >= 0 (or -1: no limit), "
                            f"got {max_failures!r}")
    try:
        import ray
        from ray.train import FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.v2.jax import JaxTrainer
    except ImportError as err:
        raise JaxtrainError(f"training on Ray needs Ray Train ({err}): "
                            "pip install 'jaxtrain[ray]'") from None
    from .run import checkpoint_folder

    cfg = _absolute_paths(load_config(config, list(overrides)))
    checkpoints = checkpoint_folder(cfg)
    loop = {"config": to_dict(cfg), "resume": resume, "callbacks": list(callbacks),
            "timeout": coordinator_timeout, "heartbeat": heartbeat_timeout}
    if not ray.is_initialized():
        ray.init()
    trainer = JaxTrainer(
        _worker, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RayRunConfig(
            name=checkpoints.parent.name, storage_path=str(checkpoints.parent.parent),
            failure_config=FailureConfig(max_failures=max_failures)))
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _worker_error(err) from None


class RayReport(Callback):
    """Report each checkpoint jaxtrain saves to Ray Train (see the module docstring)."""

    def on_checkpoint(self, trainer, step, path) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        trainer.checkpointer.wait()  # Ray may hand the folder out once it is registered
        metrics = {"step": step, **(trainer.last_train or {}),
                   **{f"eval/{k}": v for k, v in (trainer.last_eval or {}).items()}}
        rank0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path))
                         if rank0 else None,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _worker(loop: dict) -> None:
    """One Ray Train worker: join the others' JAX runtime, then train as `jaxtrain train`."""
    import ray.train
    from absl import logging as absl_logging

    from .run import run_config

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's chatter, as `jaxtrain train`
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    address = start_jax(rank, size, loop["timeout"], loop["heartbeat"])
    cfg = load(RunConfig, loop["config"])
    mesh = sharding.make_mesh(**to_dict(cfg.sharding.mesh))
    sharding.local_batch_rows(mesh, cfg.train.batch_size)  # one line before any compile
    if sharding.is_main_process():
        launch = None if size == 1 else sharding.Launch("ray", size, rank, address)
        print(sharding.describe(launch, mesh), file=sys.stderr, flush=True)
    summary = run_config(cfg, resume=loop["resume"], callbacks=[RayReport(),
                                                                *loop["callbacks"]])
    if sharding.is_main_process():
        summary.pop("after_fit", None)
        print(json.dumps(summary), flush=True)


def start_jax(rank: int, size: int, timeout: float, heartbeat_timeout: int) -> str | None:
    """Join `jax.distributed` as process `rank` of `size` (Ray's world rank and size),
    where Ray has not started it (it does on TPU and GPU workers); rank 0's address and a
    free port there are the coordinator, sent to the others through Ray. Returns the
    coordinator's address (None where nothing was started)."""
    import jax
    from ray.train.collective import broadcast_from_rank_zero

    if size == 1 or jax.distributed.is_initialized():
        return None
    address = broadcast_from_rank_zero(_coordinator_address() if rank == 0 else None)
    sharding.initialize(address, size, rank, timeout=timeout,
                        heartbeat_timeout=heartbeat_timeout)
    return address


def _coordinator_address() -> str:
    """This node's address as Ray knows it and a port free on it now."""
    import ray.util

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with `out` and `checkpoint.dir` (if given) absolute, as seen from the driver
    (both are keys a rerun may change)."""
    import dataclasses

    folder = cfg.checkpoint.dir and str(Path(cfg.checkpoint.dir).absolute())
    return dataclasses.replace(cfg, out=str(Path(cfg.out).absolute()),
                               checkpoint=dataclasses.replace(cfg.checkpoint, dir=folder))


def _worker_error(err) -> Exception:
    """A worker's `JaxtrainError` (bad input found there) as a one-line `JaxtrainError`
    naming the worker; any other failure as Ray raised it."""
    failures = getattr(err, "worker_failures", None) or {}  # rank -> the worker's exception
    for rank, failure in sorted(failures.items()):
        if isinstance(failure, JaxtrainError):
            return JaxtrainError(f"Ray worker {rank}: {failure}")
    return err
