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
    ("train.steps=99999999999", "'train.steps' must be at most 2147483647 \\(counts are int32"),
    ("data.augment={crop: 20}", "augment.crop: padding 20 must be smaller than the images' 8x8"),
    ("model.channels=0", r"model 'cnn': channels must be a positive integer \(a size\), got 0"),
    ("model.features=-1", "model 'cnn': features must be a positive integer"),
    ("data.classes=[3]", r"digit classes must be a subset of 0-9 of two or more distinct "
                         r"digits \(one class leaves nothing to tell apart\), got \[3\]"),
    ("data.classes=[3, 3]", r"two or more distinct digits .* got \[3, 3\]"),
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
    assert not list((out / "checkpoints").glob("*"))  # no step saved


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep me")
    assert main(["train", CONFIG, f"out={out}", *QUIET]) == 2
    assert "'out': " in _one_line(capsys) and out.read_text() == "keep me"
    assert main(["train", CONFIG, f"out={out / 'run'}", *QUIET]) == 2  # was exit 1
    assert f"config key 'out': cannot create the folder {out / 'run'}: {out} is not a folder" in (
        _one_line(capsys))


def test_a_task_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    assert main(["train", CONFIG, f"out={tmp_path / 'run'}", "task=language_model",
                 "train.steps=2", *QUIET]) == 2
    err = _one_line(capsys)
    assert "cannot run on the training batches (image: (64, 8, 8) float32" in err
    assert "KeyError: 'tokens'" in err


def test_images_too_small_for_the_cnn_are_one_line_naming_both_sizes(tmp_path, capsys):
    """7x7 PNGs prepared into records, trained with the 8x8 digits CNN: exit 2 and one
    line naming the images' shape and the model's (before: dot_general's contracting
    dimensions, 288 and 512); the same from the model in Python, and for RGB images."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from PIL import Image

    from jaxtrain import JaxtrainError
    from jaxtrain.data.prepare import prepare_images
    from jaxtrain.models import CNN

    pixels = np.random.default_rng(0).integers(0, 255, (16, 7, 7), dtype=np.uint8)
    for i, image in enumerate(pixels):
        (tmp_path / "pngs" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(tmp_path / "pngs" / "ab"[i % 2] / f"{i}.png")
    prepare_images(tmp_path / "pngs", tmp_path / "records", valid_fraction=0.25,
                   progress=False)
    config = str(Path(CONFIG).parent / "image_folder_cnn.yaml")
    assert main(["train", config, f"data.path={tmp_path / 'records'}", f"out={tmp_path / 'run'}",
                 "train.batch_size=8", "train.steps=2", *QUIET]) == 2
    assert ("the cnn model takes 8x8 images with 1 channel (its dense layer reads the 4x4 map "
            "pooled from them), got images of shape (7, 7, 1) (batch (8, 7, 7, 1))"
            in _one_line(capsys))
    with nnx.use_eager_sharding(False):
        model = CNN(2, channels=2, features=4, rngs=nnx.Rngs(0))
    for shape, seen in [((1, 7, 7), (7, 7, 1)), ((1, 8, 8, 3), (8, 8, 3))]:
        with pytest.raises(JaxtrainError, match=re.escape(f"got images of shape {seen}")):
            model(jnp.zeros(shape))


def test_classification_on_one_class_is_refused(tmp_path, capsys):
    """Records of one class folder: a run would report accuracy 1.0 having learnt nothing
    (before: exit 0)."""
    from PIL import Image

    from jaxtrain.data.prepare import prepare_images

    (tmp_path / "pngs" / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("L", (8, 8), 30 * i).save(tmp_path / "pngs" / "a" / f"{i}.png")
    prepare_images(tmp_path / "pngs", tmp_path / "records", valid_fraction=0.25,
                   progress=False)
    config = str(Path(CONFIG).parent / "image_folder_cnn.yaml")
    assert main(["train", config, f"data.path={tmp_path / 'records'}", f"out={tmp_path / 'run'}",
                 "train.steps=1", *QUIET]) == 2
    assert ("config key 'data': classification needs two or more classes, the data has 1"
            in _one_line(capsys))


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
    (["compare", CONFIG, "--lr-scales", "0.3,0"], "--lr-scales: must be > 0, got '0'"),
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


def test_an_out_on_a_file_system_that_refuses_files_is_refused_before_training(capsys):
    """/proc takes no new files, even from root (for whom `os.access` said writable: the
    run then failed at its first write with a traceback)."""
    out = Path("/proc") / "jaxtrain-test-run"
    assert main(["train", CONFIG, f"out={out}", *QUIET]) == 2
    assert f"config key 'out': cannot create the folder {out}: /proc is not writable" in (
        _one_line(capsys))


def test_ckpt_ls_of_a_file_says_it_is_a_file_and_what_is_wanted(tmp_path, capsys):
    step_file = tmp_path / "log.jsonl"
    step_file.write_text("{}\n")
    assert main(["ckpt", "ls", str(step_file)]) == 2
    assert f"checkpoint folder {step_file} is a file, not a folder: give the folder that " \
           "holds the numbered step folders" in _one_line(capsys)


def test_an_override_of_data_name_that_keeps_a_key_the_new_data_lacks_says_so(tmp_path,
                                                                             capsys):
    """configs/digits_cnn.yaml's data section has test_fraction; `data.name=records` keeps
    it (overrides set one key): the line names the key, what records takes, and the fix."""
    assert main(["train", CONFIG, f"out={tmp_path / 'run'}", "data.name=records",
                 f"data.path={tmp_path}", *QUIET]) == 2
    err = _one_line(capsys)
    assert "config key 'data.test_fraction': data set 'records' takes no 'test_fraction' " \
           "(it takes path, seq_len" in err
    assert "give the whole section instead, e.g. data='{name: records, ...}'" in err
