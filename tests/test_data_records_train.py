"""Training on prepared files: the shipped configs (BPE GPT printing a sample, image-folder
CNN) run a few steps; a run stopped and resumed from its checkpoint ends bitwise equal
to an uninterrupted one; every command takes `data: {name: records}`."""

import json
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain import transforms
from jaxtrain.checkpoint import CheckpointConfig
from jaxtrain.cli import main
from jaxtrain.data.prepare import prepare_images, prepare_text
from jaxtrain.data.records import load_records
from jaxtrain.models import registry
from jaxtrain.train import LoggingConfig, TrainConfig, Trainer, TrainerConfig, TrainState
from jaxtrain.train.tasks import get_task

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import sys

    root = tmp_path_factory.mktemp("records")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare_text([stdlib / "json" / "*.py"], root / "text", tokenizer="bpe", vocab_size=512,
                 progress=False)
    sys.path.insert(0, str(CONFIGS.parent / "examples"))
    try:
        from digit_folders import write_digit_folders
    finally:
        sys.path.pop(0)
    write_digit_folders(root / "pngs")
    prepare_images(root / "pngs", root / "images", progress=False)
    return root


@pytest.mark.slow  # compiles a GPT step and its generation loop: ~40 s of CPU
def test_bpe_gpt_config_trains_and_prints_a_decoded_sample(prepared, tmp_path, capsys):
    code = main(["train", str(CONFIGS / "bpe_gpt.yaml"), f"data.path={prepared / 'text'}",
                 "data.seq_len=32", "model.max_len=32", "model.num_layers=1",
                 f"out={tmp_path}", "train.steps=3", "train.eval_every=3",
                 "train.eval_batch_size=64", *QUIET])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[0])
    assert summary["step"] == 3 and np.isfinite(summary["eval"]["loss"])
    sample = "\n".join(out[1:])
    assert len(sample) > 100 and "Ġ" not in sample  # decoded by the BPE's byte decoder


def test_image_folder_config_trains(prepared, tmp_path, capsys):
    code = main(["train", str(CONFIGS / "image_folder_cnn.yaml"),
                 f"data.path={prepared / 'images'}", f"out={tmp_path}", "train.steps=30",
                 "train.eval_every=30", *QUIET])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["step"] == 30 and summary["eval"]["accuracy"] > 0.5  # 10 classes


@pytest.mark.slow  # a Grain worker process starts (imports Grain, NumPy): ~10-30 s here
def test_a_run_ends_its_loaders_worker_processes(prepared, tmp_path, monkeypatch, capsys):
    import psutil

    from jaxtrain.data import registry
    from jaxtrain.data.records import Records

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}

    def workers():  # new child processes but multiprocessing's resource tracker
        return [p for p in me.children(recursive=True) if p.pid not in before
                and "resource_tracker" not in " ".join(p.cmdline())]

    loaded, load = [], registry.load  # the test holds the data the run loaded
    monkeypatch.setattr(registry, "load", lambda *a, **k: loaded.append(load(*a, **k))
                        or loaded[-1])
    alive, close = [], Records.close
    monkeypatch.setattr(Records, "close", lambda self: (alive.append(len(workers())),
                                                        close(self)))
    code = main(["train", str(CONFIGS / "image_folder_cnn.yaml"),
                 f"data.path={prepared / 'images'}", f"out={tmp_path}", "train.steps=3",
                 "train.eval_every=3", "data.workers=1", *QUIET])
    assert code == 0 and loaded[0]["train"].workers == 1
    assert alive and alive[-1] >= 1  # the run read with a worker process...
    assert not workers()  # ...which ended with it, though the data is still held


def _trainer(path, folder, seed=0):
    data = load_records(str(path))
    model = registry.build("cnn", 0, num_classes=10, channels=4, features=16)
    state = TrainState.create(model, transforms.adam(3e-3), jax.random.PRNGKey(0))
    task = get_task("classification")
    config = TrainerConfig(train=TrainConfig(batch_size=16), seed=seed,
                           logging=LoggingConfig(progress=False),
                           checkpoint=CheckpointConfig(dir=folder, every=5, async_=False))
    trainer = Trainer(state, task.loss_fn, config)
    return trainer, data


def test_steps_per_call_trains_on_the_same_batches(prepared):
    # several steps per compiled call read their batches in one go (`Loader.many`)
    data, params = load_records(str(prepared / "images")), []
    for k in (1, 4):
        model = registry.build("cnn", 0, num_classes=10, channels=4, features=16)
        state = TrainState.create(model, transforms.adam(3e-3), jax.random.PRNGKey(0))
        config = TrainerConfig(train=TrainConfig(batch_size=16, steps_per_call=k),
                               logging=LoggingConfig(progress=False))
        trainer = Trainer(state, get_task("classification").loss_fn, config)
        params.append(jax.device_get(trainer.fit(data["train"], 8).params))
    for a, b in zip(*map(jax.tree.leaves, params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # four Trainers on 8 simulated devices: ~50 s of CPU
def test_stopped_and_resumed_run_is_bitwise_equal(prepared, tmp_path):
    trainer, data = _trainer(prepared / "images", tmp_path / "straight")
    straight = trainer.fit(data["train"], 12)
    first, data = _trainer(prepared / "images", tmp_path / "resumed")
    first.fit(data["train"], 5)  # ends with a checkpoint at step 5
    second, data = _trainer(prepared / "images", tmp_path / "resumed")  # a new process's view
    resumed = second.fit(data["train"], 12)
    assert second.start_step == 5
    a = jax.tree.leaves(jax.device_get((straight.params, straight.opt_state)))
    b = jax.tree.leaves(jax.device_get((resumed.params, resumed.opt_state)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    other, data = _trainer(prepared / "images", tmp_path / "seed1", seed=1)
    moved = other.fit(data["train"], 12)
    assert not np.array_equal(jax.device_get(jax.tree.leaves(moved.params)[0]), a[0])


@pytest.mark.slow  # five commands, each compiling its runs: about a minute on 2 cores
def test_every_command_takes_records(prepared, tmp_path, capsys):
    config = str(CONFIGS / "image_folder_cnn.yaml")
    common = [f"data.path={prepared / 'images'}", *QUIET]
    assert main(["train", config, f"out={tmp_path / 'pre'}", "train.steps=4",
                 "train.eval_every=4", *common]) == 0
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text((CONFIGS / "image_folder_cnn.yaml").read_text()
                        + "finetune: {exclude: ['head/*']}\n")
    assert main(["finetune", str(finetune), "--from", str(tmp_path / "pre" / "checkpoints"),
                 f"out={tmp_path / 'ft'}", "train.steps=4", "train.eval_every=4",
                 *common]) == 0
    capsys.readouterr()
    # the tuning commands vmap their runs: an MLP (a vmapped conv is slow on XLA:CPU)
    mlp = tmp_path / "mlp.yaml"
    mlp.write_text((CONFIGS / "image_folder_cnn.yaml").read_text().replace(
        "model: {name: cnn, channels: 16, features: 64}", "model: {name: mlp, hidden: [32]}"))
    assert "name: mlp" in mlp.read_text()
    for command, extra in (("sweep", ["--grid", "learning_rate=1e-3,3e-3"]),
                           ("compare", ["--strategies", "sgd,adam", "--seeds", "0"]),
                           ("lr-find", []), ("batch-size", ["--limit-mb", "64"])):
        code = main([command, str(mlp), *common, "train.eval_every=2", "train.steps=4",
                     "--out", str(tmp_path / command), "--quiet", *extra])
        assert code == 0, command
    assert (tmp_path / "sweep" / "sweep.json").exists()
    assert "batch size" in capsys.readouterr().out
