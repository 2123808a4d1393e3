"""The demo end to end: same accuracies on 8 devices and on 1; bad input refused."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtrain.demo import run_demo
from jaxtrain.errors import JaxtrainError

SMALL = dict(steps=60, finetune_steps=20, seeds=2, progress=False)


def test_demo_same_accuracies_on_8_and_1_devices(tmp_path, devices, capsys):
    eight = run_demo(tmp_path / "eight", devices=devices, **SMALL)
    one = run_demo(tmp_path / "one", devices=devices[:1], **SMALL)
    assert eight["devices"] == 8 and one["devices"] == 1
    assert abs(eight["pretrain_accuracy"] - one["pretrain_accuracy"]) <= 1e-3
    for way, acc in eight["accuracy"].items():
        assert len(acc["runs"]) == 2, way
        np.testing.assert_allclose(acc["runs"], one["accuracy"][way]["runs"], atol=1e-3)
        assert acc["mean"] == pytest.approx(np.mean(acc["runs"]))
        assert acc["std"] == pytest.approx(np.std(acc["runs"]))
    assert eight["pretrain_accuracy"] > 0.9
    assert eight["shots"] == 10 and eight["verdict"].startswith("pretraining")
    assert (tmp_path / "eight" / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "eight" / "log.jsonl").open()]
    assert {r["run"] for r in records} == {"pretrain", "frozen fine-tune", "full fine-tune",
                                           "scratch", "frozen fine-tune (seed 2)",
                                           "full fine-tune (seed 2)", "scratch (seed 2)"}
    assert (tmp_path / "eight" / "pretrain" / "60").is_dir()
    # a rerun into the same folder: refused before any work, naming --overwrite ...
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")}
    with pytest.raises(JaxtrainError, match="earlier run.*step 60.*--overwrite"):
        run_demo(tmp_path / "one", devices=devices[:1], **SMALL)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")} == before
    # ... and with overwrite, it says what it replaces
    capsys.readouterr()
    run_demo(tmp_path / "one", devices=devices[:1], overwrite=True, **SMALL)
    assert "replacing the earlier pretrain checkpoint" in capsys.readouterr().out
    assert (tmp_path / "one" / "pretrain" / "60").is_dir()


def test_few_shot_holds_out_everything_else():
    from jaxtrain.data import digits_split
    from jaxtrain.demo import FINETUNE_CLASSES, few_shot

    train, test = digits_split(FINETUNE_CLASSES)
    small, held_out = few_shot(train, test, 4, seed=3)
    assert np.bincount(small["label"]).tolist() == [4] * 5
    assert len(held_out["label"]) == len(train["label"]) + len(test["label"]) - 20
    seen = {x.tobytes() for x in small["image"]}
    assert not any(x.tobytes() in seen for x in held_out["image"])  # no example in both


def test_verdict_says_plainly_when_pretraining_does_not_win():
    from jaxtrain.demo import verdict

    lose = {"frozen fine-tune": [0.80, 0.82], "full fine-tune": [0.85, 0.86],
            "scratch": [0.90, 0.91]}
    assert verdict(lose).startswith("pretraining does not win: scratch is ahead")
    tie = {"frozen fine-tune": [0.80, 0.90], "full fine-tune": [0.85, 0.95],
           "scratch": [0.84, 0.92]}
    assert verdict(tie).startswith("pretraining does not clearly win")
    win = {"frozen fine-tune": [0.90, 0.91], "full fine-tune": [0.93, 0.94],
           "scratch": [0.70, 0.72]}
    assert verdict(win).startswith("pretraining wins: full fine-tune beats scratch by 22.5")


def _cli(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxtrain.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_cli_demo_runs(tmp_path, capsys):
    """`jaxtrain demo` in this process (a subprocess would add its own JAX start-up)."""
    from jaxtrain.cli import main

    args = ["demo", "--out", str(tmp_path / "o"), "--steps", "40", "--finetune-steps", "10",
            "--seeds", "2", "--shots", "5", "--quiet", "--augment", "crop=1,rotate=5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 examples per class" in out and "mean ± std over 2 seeds" in out
    assert "augmented: crop 1, rotate 5" in out and "macro F1" in out
    assert "scratch" in out
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    assert summary["augment"] == {"crop": 1, "rotate": 5}
    for way, f1 in summary["f1_macro"].items():
        assert len(f1["runs"]) == 2 and all(0 <= x <= 1 for x in f1["runs"]), way
        assert (tmp_path / "o" / f"confusion-{way.replace(' ', '-')}.png").stat().st_size > 1000
    assert any(line.startswith("pretraining") for line in out.splitlines())
    assert main(args) == 2  # the same --out again: one line naming --overwrite
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("augment, says", [("flip=true", "augment.flip"),
                                            ("crop=-1", "augment.crop"),
                                            ("crop", "KEY=VALUE")])
def test_cli_refuses_bad_augment_before_any_work(tmp_path, capsys, augment, says):
    from jaxtrain.cli import main

    try:
        code = main(["demo", "--out", str(tmp_path / "o"), "--augment", augment])
    except SystemExit as exit:  # argparse's own errors exit
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


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
