"""Bad input through `jaxtrain train` gives one line and exit code 2 naming the key, path or
value; a fault jaxtrain did not foresee gives one line and exit code 1 (no traceback)."""

import re
from pathlib import Path

import pytest

from jaxtrain import cli
from jaxtrain.cli import main

CONFIG = str(Path(__file__).parent.parent / "configs" / "digits_cnn.yaml")
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "'seed' must be an integer >= 0, got -1"),
    ("checkpoint.every=0", "'checkpoint.every' must be a positive integer or null, got 0"),
    ("train.eval_every=-5", "'train.eval_every' must be a positive integer or null, got -5"),
    ("checkpoint.max_to_keep=0", "'checkpoint.max_to_keep' must be a positive integer"),
    ("early_stopping.patience=0", "'early_stopping.patience' must be a positive integer, "),
    ("optimizer.freeze=[backbone/conv3/*]", r"'optimizer.freeze': pattern 'backbone/conv3/\*' "
                                            r"matches no parameter \(closest: backbone/conv"),
    ("optimizer.groups={head: {learning_rate: 0.1}}", "'optimizer.groups': pattern 'head' "
                                                      "matches no parameter"),
    ("optimizer.learning_rate=1e39", r"config key 'optimizer': adam: learning_rate=1e\+39 is "
                                     r"not finite in float32, the params' dtype"),
    ("optimizer.learning_rate={schedule: constant, value: 1e39}",
     r"'optimizer': adam: the learning_rate schedule's value at step 0, inf, is not finite "
     r"in float32"),
])
def test_bad_settings_are_one_line_naming_the_key(override, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", CONFIG, f"out={out}", override, *QUIET]) == 2
    assert re.search(message, _one_line(capsys))
    assert not (out / "checkpoints").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep me")
    assert main(["train", CONFIG, f"out={out}", *QUIET]) == 2
    assert "'out': " in _one_line(capsys) and out.read_text() == "keep me"


def test_a_task_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    assert main(["train", CONFIG, f"out={tmp_path / 'run'}", "task=language_model",
                 "train.steps=2", *QUIET]) == 2
    err = _one_line(capsys)
    assert "cannot run on the training batches (image: (64, 8, 8) float32" in err
    assert "KeyError: 'tokens'" in err


def test_an_unforeseen_fault_is_one_line_with_exit_code_1(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something inside\nmore lines")

    monkeypatch.setattr(cli, "cmd_ckpt_ls", broken)
    assert main(["ckpt", "ls", "x"]) == 1
    err = _one_line(capsys)
    assert "internal error: RuntimeError: something inside (please report" in err
    monkeypatch.setenv("JAXTRAIN_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["ckpt", "ls", "x"])


@pytest.mark.parametrize("args, message", [
    (["compare", CONFIG, "--seeds", "0,x"], "--seeds: must be comma-separated integers"),
    (["compare", CONFIG, "--seeds", "0,-1"], "--seeds: seeds must be >= 0"),
    (["compare", CONFIG, "--target", "nan"], "--target: must be a finite number, got 'nan'"),
    (["lr-find", CONFIG, "--min-lr", "-1"], "--min-lr: must be > 0"),
    (["batch-size", CONFIG, "--limit-mb", "inf"], "--limit-mb: must be a finite number"),
])
def test_bad_tuning_flags_are_refused_before_any_work(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
