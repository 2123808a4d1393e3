"""`jaxtrain ckpt ls` and `jaxtrain finetune CONFIG --from DIR` end to end, and their
bad input: one line on stderr, exit code 2, nothing written."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from jaxtrain import transforms
from jaxtrain.checkpoint import Manager, model_signature
from jaxtrain.cli import main
from jaxtrain.models import registry
from jaxtrain.train import TrainState

CONFIGS = ["configs/finetune_digits.yaml", "configs/finetune_digits_lora.yaml"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 10-class digits CNN checkpoint like `jaxtrain train configs/digits_cnn.yaml`
    writes (untrained here: the flow, not the accuracy, is under test)."""
    directory = tmp_path_factory.mktemp("pre")
    model = registry.build("cnn", 0, num_classes=10, channels=16, features=64)
    state = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(0))
    sig = model_signature({"name": "cnn", "num_classes": 10, "channels": 16, "features": 64},
                          state.params)
    with Manager(directory, best_metric="accuracy", best_mode="max") as mngr:
        mngr.save(100, state, sig, metrics={"accuracy": 0.9, "loss": 0.3})
        mngr.save(200, state, sig, metrics={"accuracy": 0.8, "loss": 0.2})
    return directory, state


def test_ckpt_ls_lists_steps_metrics_sizes(pretrained, capsys):
    directory, _ = pretrained
    assert main(["ckpt", "ls", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "size", "metrics"]
    assert lines[1].split()[0] == "100" and lines[1].endswith("accuracy=0.9 loss=0.3 *")
    assert lines[2].split()[0] == "200" and "MB" in lines[2] or "KB" in lines[2]
    assert main(["ckpt", "ls", "--json", str(directory)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows] == [100, 200] and rows[0]["best"]


@pytest.mark.parametrize("config", CONFIGS)
def test_finetune_from_a_checkpoint(pretrained, config, tmp_path, capsys):
    directory, state = pretrained
    out = tmp_path / "run"
    code = main(["finetune", config, "--from", str(directory), f"out={out}",
                 "train.steps=4", "train.eval_every=null", "train.log_every=2",
                 "logging.progress=false", "logging.tensorboard=false",
                 "logging.plots=false"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4
    assert summary["loaded"].startswith("loaded 6,")  # backbone: 3 layers x (kernel, bias)
    with Manager(out / "checkpoints", read_only=True) as mngr:
        meta = mngr.meta()
        params = mngr.restore_arrays(items=["params"])["params"]
    assert meta["config"]["finetune"]["from"] == str(directory)
    backbone = state.params["backbone"]
    if "lora" in config:
        assert summary["lora"] == ["backbone/dense"]
        np.testing.assert_array_equal(params["backbone"]["dense"]["base"]["kernel"],
                                      backbone["dense"]["kernel"])  # base frozen
        with Manager(summary["merged"], read_only=True) as mngr:
            merged = mngr.restore_arrays(items=["params"])["params"]
        assert set(merged["backbone"]["dense"]) == {"kernel", "bias"}
        assert not np.array_equal(merged["backbone"]["dense"]["kernel"],
                                  backbone["dense"]["kernel"])
    else:  # conv1 frozen, the rest of the backbone moved
        np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"],
                                      backbone["conv1"]["kernel"])
        assert not np.array_equal(params["backbone"]["conv2"]["kernel"],
                                  backbone["conv2"]["kernel"])
        assert params["head"]["kernel"].shape == (64, 5)


def test_bad_input_is_one_line_and_writes_nothing(pretrained, tmp_path, capsys):
    directory, _ = pretrained
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    other = tmp_path / "other"
    model = registry.build("cnn", 0, num_classes=10, channels=4, features=8)
    small = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(0))
    with Manager(other) as mngr:
        mngr.save(1, small, model_signature({"name": "cnn"}, small.params))
    cases = [
        (["ckpt", "ls", str(tmp_path / "nope")], "does not exist"),
        (["ckpt", "ls", str(empty)], "no checkpoint in"),
        (["finetune", CONFIGS[0], "--from", str(tmp_path / "nope"), f"out={out}"],
         "does not exist"),
        (["finetune", CONFIGS[0], "--from", str(empty), f"out={out}"], "no checkpoint in"),
        (["finetune", CONFIGS[0], "--from", str(directory), f"out={out}",
          "finetune.step=7"], r"no checkpoint at step 7"),
        (["finetune", CONFIGS[0], "--from", str(other), f"out={out}"],
         "no best metric was recorded in"),
        (["finetune", CONFIGS[0], "--from", str(other), f"out={out}", "finetune.step=null"],
         "no param of .* matches the new model"),
        (["finetune", CONFIGS[0], "--from", str(directory), f"out={out}",
          "finetune.lora={rank: 2}"], "finetune.lora.targets"),
        # another head shape, not excluded: 6 of 8 would load and the run would pass as fine
        (["finetune", CONFIGS[0], "--from", str(directory), f"out={out}",
          "finetune.exclude=[]"], r"loaded 6, skipped 2, new 2; 2 saved param\(s\) fit no "
                                  r"param of the new model: head/bias \(shape"),
        (["finetune", CONFIGS[0], "--from", str(directory), f"out={out}",
          "finetune.exclude=[heads/*]"], r"'finetune.exclude': pattern 'heads/\*' matches no "
                                         r"parameter \(closest: head/"),
        (["finetune", CONFIGS[0], "--from", str(directory), f"out={out}",
          "optimizer.freeze=[backbone/conv9/*]"], r"'optimizer.freeze': pattern "
                                                  r"'backbone/conv9/\*' matches no parameter"),
        (["finetune", CONFIGS[0], "--from", str(directory), f"out={out}", "privacy={}"],
         "config key 'privacy' is not supported by jaxtrain finetune"),
        (["finetune", CONFIGS[1], "--from", str(directory), f"out={out}",
          "finetune.lora.targets=[backbone/dens]"], "'finetune.lora.targets': pattern "
                                                    "'backbone/dens' matches no parameter"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists() and not (tmp_path / "nope").exists()
    assert sorted(p.name for p in empty.iterdir()) == []


def test_finetune_from_a_folder_whose_newest_step_is_damaged_falls_back(pretrained, tmp_path,
                                                                        capsys):
    directory, _ = pretrained
    copy = tmp_path / "pre"
    shutil.copytree(directory, copy)
    files = [p for p in (copy / "200" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0b100
    biggest.write_bytes(bytes(data))
    assert main(["ckpt", "ls", str(copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "damaged: checksum mismatch in state/" in lines[2] and not lines[2].endswith("*")
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint {copy}/200"):
        code = main(["finetune", CONFIGS[0], "--from", str(copy), f"out={tmp_path / 'run'}",
                     "finetune.step=null", "train.steps=2", "train.eval_every=null",
                     "logging.progress=false", "logging.tensorboard=false",
                     "logging.plots=false"])
    assert code == 0
    assert (copy / "200").is_dir()  # a reader moves nothing
