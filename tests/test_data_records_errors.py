"""Bad prepared data or bad input: one line naming the file or key, exit code 2, and the
prepared data left as it was."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxtrain.cli import main
from jaxtrain.data.prepare import prepare_images, prepare_text
from jaxtrain.data.records import load_records
from jaxtrain.errors import JaxtrainError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "text").mkdir()
    for i in range(3):
        (root / "text" / f"{i}.txt").write_text(f"line {i} of some text\n" * (50 + 10 * i))
    prepare_text([root / "text"], root / "bytes", shard_mb=0.002, progress=False)
    prepare_text([root / "text"], root / "bpe", tokenizer="bpe", vocab_size=280,
                 progress=False)
    return root


def _copy(prepared, tmp_path, name="bytes"):
    shutil.copytree(prepared / name, tmp_path / name)
    return tmp_path / name


def _one_line_error(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_missing_truncated_and_changed_shards(prepared, tmp_path, capsys):
    data = _copy(prepared, tmp_path)
    shard = data / "train" / "tokens-00001.npy"
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])
    _one_line_error(capsys, ["data", "info", str(data)], "tokens-00001.npy is")
    with pytest.raises(JaxtrainError, match="truncated"):
        load_records(str(data), seq_len=8)
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(JaxtrainError, match="does not match its SHA-256"):
        load_records(str(data), seq_len=8)
    _one_line_error(capsys, ["data", "info", "--verify", str(data)], "SHA-256")
    assert load_records(str(data), seq_len=8, verify=False)["train"]  # sizes only
    shard.unlink()
    with pytest.raises(JaxtrainError, match="tokens-00001.npy listed in .* is missing"):
        load_records(str(data), seq_len=8)


def test_other_format_version(prepared, tmp_path, capsys):
    data = _copy(prepared, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    _one_line_error(capsys, ["data", "info", str(data)], "version 99; this jaxtrain reads")


def test_other_tokenizer_and_too_long_seq_len(prepared, tmp_path):
    bpe = prepared / "bpe"
    assert load_records(str(bpe), seq_len=8, tokenizer=str(bpe / "tokenizer.json"))
    other = tmp_path / "other.json"
    tok = json.loads((bpe / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    other.write_text(json.dumps(tok))
    with pytest.raises(JaxtrainError, match="is not the one .* was prepared with"):
        load_records(str(bpe), seq_len=8, tokenizer=str(other))
    with pytest.raises(JaxtrainError, match="'seq_len' 100000 is longer than the train"):
        load_records(str(prepared / "bytes"), seq_len=100000)
    with pytest.raises(JaxtrainError, match="longest document has"):
        load_records(str(prepared / "bytes"), seq_len=1200, cross_documents=False)
    with pytest.raises(JaxtrainError, match="'seq_len' is missing"):
        load_records(str(prepared / "bytes"))


def test_inputs_with_no_files_and_images_that_do_not_decode(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["data", "prepare", "text", str(tmp_path / "empty"), "--out",
                             str(tmp_path / "o")], "holds no files")
    _one_line_error(capsys, ["data", "prepare", "text", str(tmp_path / "*.nothing"), "--out",
                             str(tmp_path / "o")], "holds no files")
    _one_line_error(capsys, ["data", "prepare", "arrays", str(tmp_path / "empty"), "--out",
                             str(tmp_path / "o")], "holds no files (.npy, .npz)")
    _one_line_error(capsys, ["data", "info", str(tmp_path / "nowhere")], "does not exist")
    (tmp_path / "img" / "cat").mkdir(parents=True)
    (tmp_path / "img" / "cat" / "a.png").write_bytes(b"not an image")
    _one_line_error(capsys, ["data", "prepare", "images", str(tmp_path / "img"), "--out",
                             str(tmp_path / "o"), "--quiet"], "none of the 1 image files")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_images_of_different_sizes_need_a_size(tmp_path):
    from PIL import Image

    for name, size in (("a", (8, 8)), ("b", (9, 8))):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / "img" / name / "x.png")
    with pytest.raises(JaxtrainError, match="pass --image-size"):
        prepare_images(tmp_path / "img", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failed_preparation_keeps_the_previous_one(prepared, tmp_path):
    data = _copy(prepared, tmp_path)
    before = (data / "manifest.json").read_text()
    with pytest.raises(JaxtrainError, match="does not exist"):
        prepare_text([prepared / "text"], data, tokenizer=str(tmp_path / "missing.json"),
                     progress=False)
    assert (data / "manifest.json").read_text() == before
    with pytest.raises(JaxtrainError, match="not a prepared data set"):
        prepare_text([prepared / "text"], prepared / "text", progress=False)


def test_a_rerun_may_read_records_another_way_but_not_other_records():
    from jaxtrain.train.config import config_changes

    saved = {"data": {"name": "records", "path": "a", "seq_len": 8, "workers": 0}}
    faster = {"data": {**saved["data"], "workers": 4, "threads": 8, "verify": False}}
    assert config_changes(saved, faster) == []
    assert config_changes(saved, {"data": {**saved["data"], "path": "b"}}) == [
        "data.path: 'a' -> 'b'"]


def _records_run(tmp_path, extra: str = ""):
    """Arrays prepared into records and a tiny regression config reading them (`extra`:
    more config lines); returns the prepare command, the config path and the input x."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, :1] * 2)
    prepare = ["data", "prepare", "arrays", str(tmp_path / "d.npz"), "--out",
               str(tmp_path / "records"), "--quiet"]
    config = tmp_path / "run.yaml"
    config.write_text(f"""out: {tmp_path / 'run'}
model: {{name: mlp, in_features: 4, out_features: 1, hidden: [8]}}
data: {{name: records, path: {tmp_path / 'records'}}}
task: regression
optimizer: {{optimizer: sgd, learning_rate: 0.1}}
train: {{steps: 2, batch_size: 16}}
checkpoint: {{async: false}}
logging: {{tensorboard: false, plots: false, progress: false}}
{extra}""")
    return prepare, config, x


def test_a_resume_on_data_prepared_again_from_other_input_is_refused(tmp_path, capsys):
    prepare, config, x = _records_run(tmp_path)
    assert main(prepare) == 0 and main(["train", str(config)]) == 0
    # prepared again from the same content (the input touched): the same data, resumed
    (tmp_path / "d.npz").touch()
    os.utime(tmp_path / "d.npz", (1, 1))
    assert main(prepare) == 0 and main(["train", str(config), "train.steps=3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 3
    np.savez(tmp_path / "d.npz", x=x[:48], y=x[:48, :1] * 3)  # other input, same path
    assert main(prepare) == 0
    _one_line_error(capsys, ["train", str(config), "train.steps=4"],
                    f"the prepared data at {tmp_path / 'records'} is not the data the run")
    _one_line_error(capsys, ["train", str(config), "train.steps=4"], "examples {'train': 58")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "3"]


def test_a_local_sgd_resume_on_data_prepared_again_from_other_input_is_refused(tmp_path,
                                                                              capsys):
    """Local SGD records the prepared data's identity with its checkpoints and checks it
    on resume, as the Trainer does (before: records were refused by local SGD, and its
    checkpoints recorded no data)."""
    prepare, config, x = _records_run(tmp_path, "local_sgd: {sync_every: 2}\n")
    assert main(prepare) == 0 and main(["train", str(config)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 2
    np.savez(tmp_path / "d.npz", x=x[:48], y=x[:48, :1] * 3)  # other input, same path
    assert main(prepare) == 0
    _one_line_error(capsys, ["train", str(config), "train.steps=4"],
                    f"the prepared data at {tmp_path / 'records'} is not the data the run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2"]
