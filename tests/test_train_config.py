"""Run configs and `jaxtrain train`: defaults, overrides, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtrain import JaxtrainError
from jaxtrain.config import load, to_dict
from jaxtrain.train.config import EarlyStoppingConfig, RunConfig, config_changes, load_config
from jaxtrain.train.run import model_kwargs
from jaxtrain.transforms.spec import build as build_spec

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_cnn.yaml"


def test_shipped_config_loads_with_defaults_and_overrides():
    cfg = load_config(CONFIG, ["train.steps=7", "optimizer.learning_rate=1e-2",
                               "checkpoint.dir=null", "early_stopping=null"])
    assert cfg.train.steps == 7 and cfg.optimizer["learning_rate"] == 0.01
    assert cfg.train.microbatches == 1 and cfg.sharding.mesh.fsdp == 1
    assert cfg.early_stopping is None and cfg.model["name"] == "cnn"
    tx = build_spec(cfg.optimizer, "config key 'optimizer': ")
    assert hasattr(tx, "init") and hasattr(tx, "update")
    assert model_kwargs("cnn", {"channels": 4}, {"num_classes": 5, "other": 1}) == {
        "num_classes": 5, "channels": 4}


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz' (valid: steps, batch_size"),
    ("trian.steps=3", "unknown config key 'trian' (valid: seed, out, model"),
    ("train.steps=abc", "config key 'train.steps' must be int, got str 'abc'"),
    ("train.steps=0", "'train.steps' must be a positive integer, got 0"),
    ("checkpoint.best=1", "config key 'checkpoint.best' must be bool, got int 1"),
    ("train.ema_decay=yes", "'train.ema_decay' must be int or float or null, got True"),
    ("model=3", "config key 'model' must be a mapping with a 'name'"),
    ("early_stopping.patiense=2", "unknown config key 'early_stopping.patiense'"),
    ("steps", "override 'steps' must be key=value"),
])
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(JaxtrainError) as err:
        load_config(CONFIG, [override])
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(JaxtrainError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: cnn\ntrain: [")
    with pytest.raises(JaxtrainError, match="not valid YAML"):
        load_config(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("model: cnn\ndata: digits\ntask: classification\n")
    with pytest.raises(JaxtrainError, match="'optimizer' is missing"):
        load_config(partial)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxtrain.cli", "train", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    for args, expect in [((str(CONFIG), "train.stepz=1"), "train.stepz"),
                         ((str(tmp_path / "missing.yaml"),), "does not exist"),
                         ((str(CONFIG), "model.name=nope", f"out={tmp_path / 'o'}"),
                          "unknown model 'nope'")]:
        result = _cli(*args)
        assert result.returncode == 2, result.stderr
        assert expect in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_cli_trains_and_resumes(tmp_path):
    out = tmp_path / "run"
    common = (str(CONFIG), f"out={out}", "train.eval_every=10", "logging.progress=false",
              "checkpoint.every=10")
    first = _cli(*common, "train.steps=20")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.splitlines()[0])
    assert summary["step"] == 20 and summary["eval"]["accuracy"] > 0.5
    assert (out / "curves.png").exists() and (out / "log.jsonl").exists()
    again = _cli(*common, "train.steps=30")
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").open()]
    train_steps = [r["step"] for r in records if r["run"] == "train"]
    assert train_steps == sorted(train_steps) and train_steps[-1] == 30
    assert [r["step"] for r in records if r["run"] == "train/eval"] == [10, 20, 30]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [10, 20, 30]


def test_typed_config_round_trips_and_names_the_closest_key():
    cfg = load_config(CONFIG, ["checkpoint.async=false", "train.ema_decay=0.99"])
    assert isinstance(cfg, RunConfig) and cfg.checkpoint.async_ is False
    assert cfg.train.ema_decay == 0.99 and cfg.early_stopping.patience == 3
    saved = to_dict(cfg)  # what a checkpoint records: plain YAML key names
    assert saved["checkpoint"]["async"] is False and saved["sharding"]["mesh"]["data"] == -1
    assert load(RunConfig, saved) == cfg
    with pytest.raises(JaxtrainError, match=r"did you mean 'train\.steps'\?"):
        load_config(CONFIG, ["train.stepz=3"])


def test_a_key_added_since_a_checkpoint_was_saved_counts_as_its_default():
    current = to_dict(load_config(CONFIG))
    old = to_dict(load_config(CONFIG))
    del old["train"]["device_data"]  # as saved before train.device_data existed
    assert config_changes(old, current) == []
    other = to_dict(load_config(CONFIG, ["train.device_data=false"]))
    assert config_changes(old, other) == ["train.device_data: 'auto' -> False"]


def test_a_python_trainer_config_is_checked_like_a_yaml_one():
    import inspect

    import jax
    import optax

    from jaxtrain.train import EarlyStopping, TrainConfig, Trainer, TrainerConfig, TrainState

    state = TrainState.create(lambda p, x: x, optax.sgd(0.1), jax.random.PRNGKey(0),
                              params={"w": jax.numpy.ones(2)})
    loss = lambda p, batch, rng: (jax.numpy.sum(p["w"]), {})  # noqa: E731
    with pytest.raises(JaxtrainError, match=r"^config key 'train.log_every' must be a "
                                            r"positive integer, got 0$"):
        Trainer(state, loss, TrainerConfig(train=TrainConfig(log_every=0)))
    with pytest.raises(JaxtrainError, match="config key 'mode' must be min or max"):
        Trainer(state, loss, TrainerConfig(mode="best"))
    with pytest.raises(JaxtrainError, match="one early stopping per Trainer"):
        Trainer(state, loss, TrainerConfig(early_stopping=EarlyStoppingConfig()),
                callbacks=[EarlyStopping()])
    # state, loss_fn, config, metric_fn, callbacks, mesh, trackers, train_step
    assert len(inspect.signature(Trainer).parameters) <= 8


def test_an_override_reaches_into_a_nested_shorthand():
    """`local_sgd.outer: sgd` stands for {optimizer: sgd}, so an override can set its
    learning rate (the shorthands come from the fields' declarations)."""
    cfg = load_config(CONFIG, ["local_sgd={outer: sgd}", "local_sgd.outer.learning_rate=0.5",
                               "optimizer=sgd", "optimizer.learning_rate=0.25"])
    assert cfg.local_sgd.outer == {"optimizer": "sgd", "learning_rate": 0.5}
    assert cfg.optimizer == {"optimizer": "sgd", "learning_rate": 0.25}


@pytest.mark.slow
def test_the_learning_rate_reaches_optax_through_few_functions(tmp_path):
    """The data flow of the YAML learning rate on `jaxtrain train`, traced: an edge
    caller -> callee where a call's arguments hold it, callee -> caller where a return
    value does, a closure's maker -> the closure; the shortest path from the YAML read to
    Optax's `inject_hyperparams` transform receiving it (13 functions before the config
    loader and the spec builder were folded). The 10 left each do a job of their own:
    read_yaml (the file and overrides), load_config (checked into a RunConfig, shared by
    every command), cmd_train, run_config, spec.build (the spec's keys), spec._optimizer
    (one optimizer entry: the base or a group's), optimizers.adam (its checks), injected
    and its closure that calls Optax (the hyperparameters' dtype is known only from the
    params, at init), Optax."""
    import collections
    import dataclasses

    import jaxtrain.cli

    lr = 0.0031234567
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("3e-3", str(lr)))

    def holds(x, depth=0):
        if isinstance(x, float):
            return x == lr
        if depth > 8:
            return False
        if isinstance(x, dict):
            x = list(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            x = [getattr(x, f.name) for f in dataclasses.fields(x)]
        return isinstance(x, list | tuple) and any(holds(v, depth + 1) for v in x)

    def ours(frame):
        return (frame.f_globals.get("__name__", "").startswith(("jaxtrain", "optax"))
                and "__create_fn__" not in frame.f_code.co_qualname)

    def label(frame):
        return f"{frame.f_globals['__name__']}.{frame.f_code.co_qualname}"

    def caller(frame):
        frame = frame.f_back
        while frame is not None and not ours(frame):
            frame = frame.f_back
        return frame

    class Reached(Exception):
        pass

    edges, start, end = collections.defaultdict(set), [], []

    def profile(frame, event, arg):
        if event not in ("call", "return") or not ours(frame):
            return
        me, up = label(frame), caller(frame)
        if event == "call" and holds(list(frame.f_locals.values())):
            if up is not None:
                edges[label(up)].add(me)
            if "<locals>" in me:
                edges[me.rsplit(".<locals>.", 1)[0]].add(me)
            if me.endswith("inject_hyperparams.<locals>.wrapped_transform"):
                end.append(me)
                raise Reached
        elif event == "return" and holds(arg):
            start.append(me)
            if up is not None:
                edges[me].add(label(up))

    sys.setprofile(profile)
    try:
        jaxtrain.cli.main(["train", str(config), f"out={tmp_path / 'run'}"])
    except Reached:
        pass
    finally:
        sys.setprofile(None)
    before, queue = {start[0]: None}, collections.deque(start[:1])
    while queue:  # breadth first from the YAML read
        node = queue.popleft()
        for nxt in sorted(edges[node] - set(before)):
            before[nxt] = node
            queue.append(nxt)
    path, node = [], end[0]
    while node is not None:
        path.append(node)
        node = before[node]
    path = [p.rpartition(".<locals>")[0] or p for p in reversed(path)]
    assert path[0] == "jaxtrain.config.read_yaml" and "inject_hyperparams" in path[-1]
    assert len(path) <= 10, " -> ".join(path)
