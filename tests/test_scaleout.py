"""`jaxtrain train` on several real processes (2 x 4 simulated CPU devices on localhost),
launched as SLURM's srun, torchrun and Open MPI's mpirun would, equals the same run on one
process with 8 devices; how a launch is detected; failures end with one line.

The multi-process runs are `slow` (each launch compiles the step in every process: about
20-40 s on 2 idle cores, several minutes when the machine is shared)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from _multiprocess import HERE, base_env, free_port, launch

from jaxtrain import cli, sharding
from jaxtrain.checkpoint import Manager
from jaxtrain.errors import JaxtrainError
from jaxtrain.sharding import Launch, detect_launch
from jaxtrain.train.config import load_config

WORKER = str(HERE / "scaleout_worker.py")
TIMEOUT = 600  # per launch; a run that hangs is killed then, and fails its test
# s, --heartbeat-timeout of the failure test: at 10 s a fresh-clone run saw both processes
# declared unhealthy before the kill (heartbeats starved while Ray started beside them)
HEARTBEAT = 25
KILL_BOUND = HEARTBEAT + 20  # s from a kill to the survivor's end (heartbeat, abort, load)
STEPS = 8
CONFIG = {
    "seed": 0,
    "model": {"name": "cnn", "channels": 8, "features": 16},
    "data": {"name": "digits", "test_fraction": 0.25},
    "task": "classification",
    "optimizer": {"optimizer": "adam", "learning_rate": 3e-3},
    "train": {"steps": STEPS, "batch_size": 32, "eval_every": 4, "log_every": 1,
              "eval_batch_size": 128},
    "checkpoint": {"every": 3, "max_to_keep": 5},
    "logging": {"tensorboard": True, "plots": True, "progress": True},
}
# fsdp over all 8 devices: every param is split over both processes, so a complete
# checkpoint needs each process's shards; the host feed (device_data false) is recorded.
FSDP = {"sharding": {"preset": "fsdp", "mesh": {"data": 1, "fsdp": 8}},
        "train": {"device_data": False}}
DP = {"sharding": {"preset": "dp", "mesh": {"data": -1}}}


def _config(tmp: Path, name: str, extra: dict) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    cfg["out"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(out: Path) -> tuple[list, list]:
    """(train, eval) records of a run's log.jsonl."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["run"] == "train"], [r for r in rows if r["run"] != "train"]


def _params(out: Path) -> dict:
    with Manager(out / "checkpoints", read_only=True) as mngr:
        return jax.tree.map(np.asarray, mngr.restore_arrays(items=["params"])["params"])


def _assert_same_run(got: Path, want: Path, rtol=1e-5, atol=1e-6) -> None:
    """Per-step losses, eval metrics and final params of two runs agree."""
    (train_a, eval_a), (train_b, eval_b) = _records(got), _records(want)
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == list(
        range(1, STEPS + 1))  # each step logged once: by process 0 only
    for a, b in zip(train_a + eval_a, train_b + eval_b, strict=True):
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
                 _params(got), _params(want))


def _slurm(rank: int, port: int) -> dict:
    """What `srun --ntasks=2` sets (JAX's SLURM detection reads these)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "JAX_COORDINATOR_PORT": str(port)}


def _torchrun(rank: int, port: int) -> dict:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "RANK": str(rank)}


def _train(launcher, config: Path, rows: Path, args=(), env=None, end_others=True):
    rows.mkdir(exist_ok=True)
    port = free_port()
    commands = []
    for rank in range(2):
        child = {**base_env(4), **launcher(rank, port), **(env or {})}
        commands.append(([sys.executable, WORKER, "train", str(rows), str(config), *args],
                         child))
    return launch(commands, TIMEOUT, end_others=end_others)


def _first_position(rows: Path) -> int:
    """The first batch position process 0 read: where the run started or resumed."""
    return json.loads((rows / "rows-0.jsonl").read_text().splitlines()[0])["position"]


def _ok(results) -> None:
    for i, (code, _, text) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{text[-3000:]}"


# -- how a launch is detected (no processes started) -------------------------------------

def test_one_process_and_no_variables_start_nothing(monkeypatch):
    for key in ("MASTER_ADDR", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "SKYPILOT_NODE_IPS"):
        monkeypatch.delenv(key, raising=False)
    assert detect_launch() is None
    assert detect_launch(env={"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": "1",
                              "RANK": "0"}) is None


def test_launchers_are_read_from_their_variables(monkeypatch):
    torchrun = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "16",
                "RANK": "3"}
    assert detect_launch(env=torchrun) == Launch("torchrun", 16, 3, "10.0.0.1:29501")
    assert detect_launch(env={**torchrun, "JAX_COORDINATOR_PORT": "7000"}).coordinator == \
        "10.0.0.1:7000"
    sky = {"SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8\n", "SKYPILOT_NODE_RANK": "1",
           "SKYPILOT_NUM_NODES": "2"}
    assert detect_launch(env=sky) == Launch("skypilot", 2, 1, "10.0.0.7:8476")
    # explicit flags come above every variable
    assert detect_launch("h:1", 4, 2, env=torchrun) == Launch("flags", 4, 2, "h:1")
    # SLURM through JAX's own detection (which reads os.environ)
    for key, value in _slurm(1, 1234).items():
        monkeypatch.setenv(key, value)
    assert detect_launch() == Launch("slurm", 2, 1, None)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert detect_launch() is None  # a one-task allocation is one process


@pytest.mark.parametrize("args, env, match", [
    (("h:1", 2, None), {}, "together"),
    (("h:1", 2, 2), {}, r"process_id=2 must be an integer in \[0, 2\)"),
    (("nohost", 2, 0), {}, "must be host:port"),
    ((None, None, None), {"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": "two",
                          "RANK": "0"}, "WORLD_SIZE='two' must be an integer"),
])
def test_bad_launch_values_are_one_line(args, env, match):
    with pytest.raises(JaxtrainError, match=match) as err:
        detect_launch(*args, env=env)
    assert "\n" not in str(err.value)


def test_trainer_refuses_a_launch_that_never_joined(monkeypatch):
    for key, value in _torchrun(1, 1234).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(JaxtrainError, match="process 1 of 2 .*start_from_env"):
        sharding.check_started()


def test_heartbeat_timeout_reaches_jax(monkeypatch, tmp_path):
    # the bound on how long the others live after a process dies is JAX's heartbeat
    # timeout: the CLI's --heartbeat-timeout must arrive in jax.distributed.initialize
    from jaxtrain.sharding import distributed

    calls = []
    monkeypatch.setattr(distributed, "_backend_started", lambda: False)
    monkeypatch.setattr(distributed, "wait_for_coordinator", lambda *a: None)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    config = _config(tmp_path, "heartbeat", DP)
    args = cli.build_parser().parse_args(["train", str(config), "--coordinator", "h:1",
                                          "--num-processes", "2", "--process-id", "1",
                                          "--heartbeat-timeout", "7"])
    cli.start_processes(args, load_config(config))
    assert calls[0]["heartbeat_timeout_seconds"] == 7 and calls[0]["process_id"] == 1


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
    # A fresh process: jax.distributed must start before any backend, and this test
    # process already has one.
    config = _config(tmp_path, "unreachable", DP)
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "jaxtrain.cli", "train", str(config), "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
         "--coordinator-timeout", "2"], env=base_env(4), capture_output=True, text=True,
        timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err, err
    assert f"coordinator 127.0.0.1:{port} cannot be reached within 2 s" in err.splitlines()[-1]


@pytest.mark.parametrize("override, match", [
    ("sharding.mesh.data=3", "mesh sizes data=3 x fsdp=1 x tensor=1 multiply to 3, but "
                             "there are 8 devices"),
    ("train.batch_size=12", "global batch size 12 is not divisible by the 8-way data "
                            "parallelism"),
])
def test_bad_mesh_or_batch_is_one_line_before_compiling(tmp_path, capsys, override, match):
    config = _config(tmp_path, "bad", {**DP, "train": {"device_data": False}})
    assert cli.main(["train", str(config), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1] and err[-1].startswith("jaxtrain train: error:")
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any(
        (tmp_path / "bad" / "checkpoints").iterdir())


# -- real processes -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, devices):
    """One process x 8 devices through the same CLI, for both presets (the references)."""
    tmp = tmp_path_factory.mktemp("scaleout")
    for name, extra in (("one_fsdp", FSDP), ("one_dp", DP)):
        assert cli.main(["train", str(_config(tmp, name, extra))]) == 0
    return tmp


@pytest.fixture(scope="module")
def slurm_fsdp(runs):
    """The fsdp run on 2 processes x 4 devices, launched with srun's variables."""
    config = _config(runs, "slurm_fsdp", FSDP)
    results = _train(_slurm, config, runs / "rows_slurm")
    return runs / "slurm_fsdp", results


@pytest.mark.slow
def test_slurm_fsdp_matches_one_process(runs, slurm_fsdp):
    out, results = slurm_fsdp
    _ok(results)
    _assert_same_run(out, runs / "one_fsdp")
    (_, _, first), (_, _, second) = results
    assert "slurm launch: 2 process(es), 8 cpu device(s) (4 local), mesh data=1 x fsdp=8" \
        in first
    # process 0 alone reports: progress lines, the summary; process 1 prints none of them
    assert '"step": 8' in first and "train: step" in first
    assert '"step": 8' not in second and "train: step" not in second and "launch" not in second
    assert (out / "curves.png").exists()
    assert len(list((out / "tensorboard").iterdir())) == 1  # one writer's event file


@pytest.mark.slow
def test_host_feed_reads_only_this_process_rows_on_every_call(runs, slurm_fsdp):
    _ok(slurm_fsdp[1])
    for rank in range(2):
        calls = [json.loads(line) for line in
                 (runs / "rows_slurm" / f"rows-{rank}.jsonl").read_text().splitlines()]
        assert [c["position"] for c in calls] == list(range(STEPS))
        for c in calls:  # 32 rows a batch, 16 on each process's 4 devices
            assert (c["start"], c["stop"], c["size"]) == (16 * rank, 16 * rank + 16, 16), c


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_and_in_four_bitwise(runs, slurm_fsdp):
    _ok(slurm_fsdp[1])
    ckpt = runs / "slurm_fsdp" / "checkpoints"
    one = _params(runs / "slurm_fsdp")  # this process, its 8 devices
    port, npz = free_port(), runs / "four.npz"
    commands = [([sys.executable, WORKER, "restore", str(ckpt), str(npz)],
                 {**base_env(2), "SCALEOUT_COORDINATOR": f"127.0.0.1:{port}",
                  "SCALEOUT_NUM": "4", "SCALEOUT_ID": str(i)}) for i in range(4)]
    _ok(launch(commands, TIMEOUT))
    four = np.load(npz)
    flat = {jax.tree_util.keystr(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(one)}
    assert sorted(four.files) == sorted(flat)
    for key, x in flat.items():
        np.testing.assert_array_equal(four[key], x, err_msg=key)


@pytest.mark.slow
def test_torchrun_and_mpirun_dp_match_one_process(runs):
    config = _config(runs, "torchrun_dp", DP)
    _ok(_train(_torchrun, config, runs / "rows_torchrun"))
    _assert_same_run(runs / "torchrun_dp", runs / "one_dp")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is absent (Debian: apt-get install openmpi-bin); the torchrun "
                    "launch above ran")
    config = _config(runs, "mpirun_dp", DP)
    env = base_env(4)
    command = [mpirun, "-np", "2", "--oversubscribe", "--allow-run-as-root",
               "-x", "XLA_FLAGS", "-x", "PYTHONPATH", "-x", "JAX_PLATFORMS",
               "-x", f"JAX_COORDINATOR_PORT={free_port()}",
               sys.executable, WORKER, "train", str(runs / "rows_mpirun"), str(config)]
    (runs / "rows_mpirun").mkdir()
    (code, _, text), = launch([(command, env)], TIMEOUT)
    assert code == 0, text[-3000:]
    assert "ompi launch: 2 process(es), 8 cpu device(s) (4 local)" in text
    _assert_same_run(runs / "mpirun_dp", runs / "one_dp")


@pytest.mark.slow
def test_a_killed_process_ends_the_other_the_rerun_resumes_and_signals_agree(
        runs, slurm_fsdp):
    _ok(slurm_fsdp[1])
    config = _config(runs, "failing", {**FSDP, "train": {"device_data": False,
                                                         "log_every": 3}})
    same = ("--heartbeat-timeout", str(HEARTBEAT))  # every launch: the same command
    # process 1 is SIGKILLed when it reads batch 5 (checkpoint 3 was begun at step 3):
    # the survivor must end by itself, soon, never hang
    (code0, end0, text0), (code1, end1, text1) = _train(
        _torchrun, config, runs / "rows_kill", same, {"SCALEOUT_SIGNALS": "1:5:SIGKILL"},
        end_others=False)
    assert code1 == -9, f"process 1 exited {code1}:\n{text1[-3000:]}"
    assert code0 not in (0, -9), f"process 0 did not end by itself:\n{text0[-3000:]}"
    assert end0 - end1 < KILL_BOUND, (end0 - end1, text0[-3000:])
    print(f"survivor: code {code0}, {end0 - end1:.1f} s after the kill; last line: "
          f"{text0.strip().splitlines()[-1][:300]}")
    ckpt = runs / "failing" / "checkpoints"
    saved = Manager(ckpt, read_only=True).steps()
    assert saved in ([], [3])  # 3 unless the kill came before its commit
    # the same command resumes from the last complete checkpoint; SIGTERM reaches its
    # processes at different steps (4 and 5): both stop at the step where they agree (the
    # log step 6), save it and end as a signal would
    results = _train(_torchrun, config, runs / "rows_term", same,  # 143 is no failure:
                     {"SCALEOUT_SIGNALS": "1:4:SIGTERM,0:5:SIGTERM"}, end_others=False)
    for i, (code, _, text) in enumerate(results):
        assert code == 128 + 15, f"process {i} exited {code}:\n{text[-3000:]}"
    assert "stopped by SIGTERM at step 6" in results[0][2]
    assert _first_position(runs / "rows_term") == (saved or [0])[-1]
    assert Manager(ckpt, read_only=True).steps()[-1] == 6
    # step 6 equals step 6 of the run that was never interrupted, bitwise
    with Manager(ckpt, read_only=True) as got, \
            Manager(runs / "slurm_fsdp" / "checkpoints", read_only=True) as want:
        jax.tree.map(np.testing.assert_array_equal,
                     got.restore_arrays(6, items=["params", "opt_state"]),
                     want.restore_arrays(6, items=["params", "opt_state"]))
