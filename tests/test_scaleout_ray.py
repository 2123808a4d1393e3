"""`jaxtrain train` under Ray Train's `JaxTrainer` on a local Ray cluster (2 CPU workers x
4 simulated devices): equals the same run on 1 process x 8 devices; a worker killed
mid-run is replaced by Ray (`FailureConfig(max_failures=1)`), and the restarted group
resumes from the last checkpoint and ends bitwise equal to the uninterrupted run.

Ray is heavy on 2 cores: both runs share one Ray session (one module fixture), and the
workers share a compilation cache of their own (the later groups' workers can all load
the programs the first group compiled, none ahead of the other; measured, it saves only
3-6 s). The file costs about 105-110 s of CPU, every Ray
process counted (sampled from /proc; `/usr/bin/time` sees only ~22 s, as the processes
Ray starts never reach its rusage): each of the 3 worker groups started brings ~4 Ray
helper processes of ~2 s each, and each of the 6 training workers ~10 s (importing Ray
Train and jaxtrain ~4 s, compiling and training ~6 s). The first run goes through the CLI
(`jaxtrain train CONFIG --ray-workers 2`), the second through `train_on_ray`, which
also takes the test's callback."""

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from _multiprocess import base_env

from jaxtrain import cli
from jaxtrain.checkpoint import Manager
from jaxtrain.errors import JaxtrainError
from jaxtrain.train.callbacks import Callback

STEPS = 8
CONFIG = {
    "seed": 0,
    "model": {"name": "cnn", "channels": 8, "features": 16},
    "data": {"name": "digits", "test_fraction": 0.25},
    "task": "classification",
    "optimizer": {"optimizer": "adam", "learning_rate": 3e-3},
    # fsdp over all 8 devices: every param is split over both workers, so each checkpoint
    # needs both workers' shards; the host feed gives each worker its own rows
    "sharding": {"preset": "fsdp", "mesh": {"data": 1, "fsdp": 8}},
    "train": {"steps": STEPS, "batch_size": 32, "eval_every": 4, "log_every": 1,
              "eval_batch_size": 128, "device_data": False},
    "checkpoint": {"every": 3, "max_to_keep": 5},
    "logging": {"tensorboard": False, "plots": False, "progress": False},
}
KILL = (1, 5)  # worker 1 is SIGKILLed after step 5 (checkpoint 3 is registered by then)


class KillOnce(Callback):
    """Kill worker `rank` after `step` in a run that started from scratch (so the restarted
    group, which resumes, lives), once Ray has registered the checkpoints reported so far;
    record where each worker's run started and the checkpoint Ray handed it."""

    def __init__(self, rank: int, step: int, record: str):
        self.rank, self.step, self.record = rank, step, record

    def on_fit_start(self, trainer, state):
        import ray.train

        given = ray.train.get_checkpoint()
        with open(self.record, "a") as f:
            f.write(json.dumps([jax.process_index(), trainer.start_step,
                                given and Path(given.path).name]) + "\n")

    def on_step_end(self, trainer, before, step, state):
        if (jax.process_index(), step) == (self.rank, self.step) and trainer.start_step == 0:
            import ray.train

            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
            os.kill(os.getpid(), signal.SIGKILL)


def _config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "out": str(tmp / name)}))
    return path


def _records(out: Path) -> list:
    """The train and eval records of a run's log.jsonl, the last one of each step kept (a
    resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return sorted({(r["run"], r["step"]): r for r in rows}.values(),
                  key=lambda r: (r["run"], r["step"]))


def _arrays(out: Path, step: int) -> dict:
    with Manager(out / "checkpoints", read_only=True) as mngr:
        return mngr.restore_arrays(step, items=["params", "opt_state"])


def test_ray_flags_are_checked_before_ray_starts(tmp_path, capsys):
    config = str(_config(tmp_path, "flags"))
    assert cli.main(["train", config, "--ray-workers", "2", "--coordinator", "h:1"]) == 2
    assert capsys.readouterr().err.strip() == ("jaxtrain train: error: --ray-workers starts "
                                               "its own processes: leave out --coordinator")
    assert cli.main(["train", config, "--ray-workers", "2", "--ray-max-failures", "-2"]) == 2
    assert "--ray-max-failures must be an integer >= 0 (or -1: no limit), got -2" in \
        capsys.readouterr().err
    assert not (tmp_path / "flags").exists()


def test_a_workers_bad_input_is_one_line_naming_the_worker():
    from ray.train import WorkerGroupError

    from jaxtrain.train.ray_train import _worker_error

    # what Ray raises when worker 1's training function raised (rank -> its exception)
    err = WorkerGroupError("worker 1 failed", {0: RuntimeError("gloo: peer gone"),
                                                1: JaxtrainError("mesh sizes data=3 ...")})
    got = _worker_error(err)
    assert isinstance(got, JaxtrainError) and str(got) == "Ray worker 1: mesh sizes data=3 ..."
    other = WorkerGroupError("worker 0 failed", {0: RuntimeError("gloo: peer gone")})
    assert _worker_error(other) is other  # not bad input: the CLI's internal-error line


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory, devices):
    """The 1-process reference (in this process, 8 devices), then in one Ray session the
    2-worker run (through the CLI; returns what it printed last) and the 2-worker run
    with worker 1 killed (Ray's `Result`)."""
    import ray

    from jaxtrain.train.ray_train import train_on_ray

    tmp = tmp_path_factory.mktemp("ray")
    assert cli.main(["train", str(_config(tmp, "one"))]) == 0
    child = base_env(4)  # 4 devices a worker; KillOnce unpickled from this file
    env = {k: child[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    env.update(OPENBLAS_NUM_THREADS="1", JAX_COMPILATION_CACHE_DIR=str(tmp / "xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    with pytest.MonkeyPatch.context() as patch:
        # one helper process fewer per worker group (~2 s CPU each); nothing is preempted
        patch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
                 runtime_env={"env_vars": env})
        try:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert cli.main(["train", str(_config(tmp, "whole")), "--ray-workers",
                                 "2"]) == 0
            whole = json.loads([line for line in printed.getvalue().splitlines()
                                if line.startswith('{"metrics"')][-1])
            killed = train_on_ray(str(_config(tmp, "killed")), num_workers=2,
                                  max_failures=1,
                                  callbacks=[KillOnce(*KILL, str(tmp / "starts.jsonl"))])
        finally:
            ray.shutdown()
    return tmp, whole, killed


@pytest.mark.slow
def test_two_ray_workers_match_one_process(ray_runs):
    tmp, whole, _ = ray_runs
    got, want = _records(tmp / "whole"), _records(tmp / "one")
    assert [(r["run"], r["step"]) for r in got] == [(r["run"], r["step"]) for r in want]
    assert len(got) == STEPS + 2  # 8 training steps, evaluations at 4 and 8
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _arrays(tmp / "whole", STEPS), _arrays(tmp / "one", STEPS))
    # Ray got the last checkpoint's metrics and registered the Orbax step folder in place
    metrics = whole["metrics"]
    assert metrics["step"] == STEPS
    np.testing.assert_allclose(metrics["loss"], got[STEPS - 1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["eval/accuracy"], got[-1]["accuracy"], rtol=1e-6)
    assert Path(whole["checkpoint"]) == tmp / "whole" / "checkpoints" / str(STEPS)


@pytest.mark.slow
def test_a_killed_ray_worker_is_replaced_and_the_run_resumes_bitwise(ray_runs):
    tmp, _, killed = ray_runs
    starts = [tuple(json.loads(line)) for line in
              (tmp / "starts.jsonl").read_text().splitlines()]
    # both workers began at step 0; Ray handed the restarted group checkpoint 3, the last
    # one registered before the kill, and it resumed there
    assert sorted(starts) == [(0, 0, None), (0, 3, "3"), (1, 0, None), (1, 3, "3")], starts
    assert killed.error is None and killed.metrics["step"] == STEPS
    assert Path(killed.checkpoint.path) == tmp / "killed" / "checkpoints" / str(STEPS)
    assert [(Path(c.path).name, m["step"]) for c, m in killed.best_checkpoints] == [
        ("3", 3), ("6", 6), ("8", 8)]  # every checkpoint registered, with its metrics
    for step in (6, STEPS):  # params and optimizer state equal the uninterrupted run's
        jax.tree.map(np.testing.assert_array_equal, _arrays(tmp / "killed", step),
                     _arrays(tmp / "whole", step))
