"""The demo end to end: same accuracies on 8 devices and on 1; bad input refused."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxtrain.demo import run_demo


def test_demo_same_accuracies_on_8_and_1_devices(tmp_path, devices):
    eight = run_demo(tmp_path / "eight", steps=60, devices=devices, progress=False)
    one = run_demo(tmp_path / "one", steps=60, devices=devices[:1], progress=False)
    assert eight["devices"] == 8 and one["devices"] == 1
    for stage, acc in eight["accuracy"].items():
        assert abs(acc - one["accuracy"][stage]) <= 1e-3, stage
    assert eight["accuracy"]["pretrain (0-4)"] > 0.9
    assert (tmp_path / "eight" / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "eight" / "log.jsonl").open()]
    assert {r["run"] for r in records} == {"pretrain", "frozen fine-tune", "full fine-tune",
                                           "scratch"}
    assert (tmp_path / "eight" / "pretrain" / "60").is_dir()


def _cli(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxtrain.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_demo_runs(tmp_path):
    result = _cli("demo", "--out", str(tmp_path / "o"), "--steps", "40", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "full fine-tune (5-9)" in result.stdout and "scratch (5-9)" in result.stdout


def test_cli_refuses_negative_steps(tmp_path):
    result = _cli("demo", "--steps", "-3", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "--steps" in result.stderr and "-3" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_refuses_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = _cli("demo", "--out", str(blocker / "sub"), "--steps", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot be written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_cli_refuses_checkpoint_of_other_model(tmp_path):
    from flax import nnx

    from jaxtrain import transforms
    from jaxtrain.checkpoint import Manager, model_signature
    from jaxtrain.models import CNN
    from jaxtrain.train import TrainState

    with nnx.use_eager_sharding(False):
        model = CNN(10, channels=8, rngs=nnx.Rngs(0))
    state = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(0))
    out = tmp_path / "o"
    mngr = Manager(out / "pretrain")
    mngr.save(5, state, model_signature(model.config, state.params))
    mngr.close()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = _cli("demo", "--out", str(out), "--steps", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "different model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
