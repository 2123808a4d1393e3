"""Every training strategy from a config: each `configs/` example runs for a few steps,
and what it reports is checked against a computation done another way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxtrain.train.config import load_config
from jaxtrain.train.run import run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = ["logging.plots=false", "logging.progress=false", "logging.tensorboard=false"]


def _config(name: str, tmp_path, *overrides):
    return load_config(CONFIGS / name, [f"out={tmp_path}", *QUIET, *overrides])


def _trained_model(cfg, folder):
    """The config's model with the params of the last checkpoint in `folder`."""
    from jaxtrain.models import registry
    from jaxtrain.strategies import load_teacher

    model = dict(cfg.model)
    return load_teacher(registry.build(model.pop("name"), 0, **model),
                        Path(folder) / "checkpoints")


def test_regression_reports_r2_as_sklearn_computes_it(tmp_path):
    """configs/synthetic_regression.yaml: the held-out R^2 equals scikit-learn's r2_score
    of the trained model's predictions, and comes near the least-squares fit's."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import mean_squared_error, r2_score

    from jaxtrain.data import registry

    cfg = _config("synthetic_regression.yaml", tmp_path, "train.steps=200",
                  "train.eval_every=200")
    summary = run_config(cfg)
    data_cfg = dict(cfg.data)
    data = registry.load(data_cfg.pop("name"), **data_cfg)
    train, valid = data["train"], data["valid"]
    model = _trained_model(cfg, tmp_path)
    pred = np.asarray(model(valid["x"]))
    assert summary["eval"]["r2"] == pytest.approx(r2_score(valid["y"], pred), abs=1e-5)
    assert summary["eval"]["loss"] == pytest.approx(mean_squared_error(valid["y"], pred),
                                                    rel=1e-5)
    best = r2_score(valid["y"], LinearRegression().fit(train["x"], train["y"])
                    .predict(valid["x"]))
    assert best - 0.02 < summary["eval"]["r2"] <= best + 1e-3, (summary["eval"], best)


def _saved(folder) -> dict:
    """The arrays of the newest checkpoint in `folder`/checkpoints."""
    from jaxtrain.checkpoint import Manager

    with Manager(Path(folder) / "checkpoints", read_only=True) as mngr:
        return mngr.restore_arrays()


def _data(cfg) -> dict:
    from jaxtrain.data import registry

    data_cfg = dict(cfg.data)
    return registry.load(data_cfg.pop("name"), **data_cfg)


def _log(folder, run="train") -> list[dict]:
    import json

    return [r for r in map(json.loads, (Path(folder) / "log.jsonl").open()) if r["run"] == run]


def test_pruning_from_config_follows_the_polynomial_schedule(tmp_path):
    """configs/digits_mlp_pruned.yaml: after 8 steps (masks recomputed at optimizer steps 0
    and 4) the kernels' zero fraction is floor(s(4) * n) / n with Zhu & Gupta's
    s(t) = s_f + (s_i - s_f)(1 - t/n_steps)^3 written out here; biases keep every entry."""
    cfg = _config("digits_mlp_pruned.yaml", tmp_path, "train.steps=8", "train.log_every=4",
                  "train.eval_every=8", "optimizer.prune.sparsity.end_step=16",
                  "optimizer.prune.update_every=4")
    summary = run_config(cfg)
    params = _saved(tmp_path)["params"]
    kernels = [np.asarray(v) for k, v in _flat(params).items() if k.endswith("kernel")]
    biases = [np.asarray(v) for k, v in _flat(params).items() if k.endswith("bias")]
    n = sum(k.size for k in kernels)
    target = 0.8 + (0.0 - 0.8) * (1 - 4 / 16) ** 3
    assert sum(int((k == 0).sum()) for k in kernels) == int(np.floor(target * n))
    assert all((b != 0).any() for b in biases)
    assert summary["eval"]["accuracy"] > 0.2  # learning (chance: 0.1)


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_bf16_params_and_state_with_stochastic_rounding_from_config(tmp_path):
    """configs/digits_mlp_bf16.yaml: params and Adam's moments are stored in bfloat16,
    the chain ends in stochastic rounding, and the model learns."""
    cfg = _config("digits_mlp_bf16.yaml", tmp_path, "train.steps=20", "train.log_every=5",
                  "train.eval_every=20")
    summary = run_config(cfg)
    saved = _saved(tmp_path)
    dtypes = {str(np.asarray(x).dtype) for x in _leaves(saved["params"])}
    assert dtypes == {"bfloat16"}
    floats = [x for x in _leaves(saved["opt_state"]) if np.asarray(x).dtype.kind in "fV"
              and np.asarray(x).size > 1]
    assert floats and {str(np.asarray(x).dtype) for x in floats} == {"bfloat16"}
    losses = [r["loss"] for r in _log(tmp_path)]
    assert losses[-1] < 0.85 * losses[0], losses
    assert summary["eval"]["accuracy"] > 0.3  # learning (chance: 0.1)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_float16_with_loss_scaling_from_config(tmp_path):
    """configs/digits_mlp_float16.yaml: the logged loss scale is 2^15 halved once per
    overflowing step (a power of two, never above 2^15), params stay float32, the model
    learns."""
    cfg = _config("digits_mlp_float16.yaml", tmp_path, "train.steps=30", "train.log_every=1",
                  "train.eval_every=30")
    summary = run_config(cfg)
    scales = [r["loss_scale"] for r in _log(tmp_path)]
    assert len(scales) == 30
    exponents = np.log2(scales)
    assert np.all(exponents == np.round(exponents)) and max(scales) <= 2.0**15
    assert np.all(np.diff(exponents) <= 0)  # 30 steps < the 2000 that would double it
    assert {str(np.asarray(x).dtype) for x in _leaves(_saved(tmp_path)["params"])} == {
        "float32"}
    losses = [r["loss"] for r in _log(tmp_path)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert summary["eval"]["accuracy"] > 0.6


def test_ema_evaluation_from_config(tmp_path):
    """configs/digits_mlp_ema.yaml: the held-out loss reported is that of the saved EMA
    params (computed here in numpy), not that of the trained params."""
    cfg = _config("digits_mlp_ema.yaml", tmp_path, "train.steps=20", "train.log_every=10",
                  "train.eval_every=20", "train.ema_decay=0.8")
    summary = run_config(cfg)
    saved = _saved(tmp_path)
    valid = _data(cfg)["valid"]

    def loss(params):
        x = valid["image"].reshape(len(valid["image"]), -1).astype(np.float64)
        for i in range(len(params["layers"])):
            layer = params["layers"][str(i)]
            x = np.maximum(x @ layer["kernel"] + layer["bias"], 0)
        logits = x @ params["head"]["kernel"] + params["head"]["bias"]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(logp)), valid["label"]].mean())

    to64 = lambda t: {k: to64(v) if isinstance(v, dict) else np.asarray(v, np.float64)
                      for k, v in t.items()}
    ema, raw = loss(to64(saved["ema_params"])), loss(to64(saved["params"]))
    assert summary["eval"]["loss"] == pytest.approx(ema, rel=1e-4)
    assert abs(ema - raw) > 1e-2 * raw  # the two differ: the test can tell them apart


@pytest.mark.parametrize("entry, message", [
    ({"state_dtype": "bf16"}, "unknown dtype 'bf16' (did you mean 'bfloat16'?)"),
    ({"prune": {"scope": "global"}}, "prune: needs 'sparsity'"),
    ({"prune": {"sparsity": {"final": 0.5, "end": 10}}}, "prune.sparsity: unknown key 'end'"),
    ({"prune": {"sparsity": 1.5}}, "sparsity must be in [0, 1)"),
    ({"stochastic_rounding": {"sed": 1}}, "unknown key 'sed' (did you mean 'seed'?)"),
])
def test_strategy_spec_keys_refuse_bad_values_in_one_line(entry, message):
    from jaxtrain.errors import JaxtrainError
    from jaxtrain.transforms.spec import build

    with pytest.raises(JaxtrainError) as err:
        build({"optimizer": "adam", "learning_rate": 1e-3, **entry}).init({"kernel": np.ones(3)})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plateau_on_held_out_accuracy_takes_torch_decisions(tmp_path):
    """configs/digits_mlp_plateau.yaml: the learning rate of the step after each
    evaluation is the one torch's ReduceLROnPlateau(mode='max') gives when stepped with
    the same held-out accuracies; the steps between evaluations keep it."""
    torch = pytest.importorskip("torch")

    cfg = _config("digits_mlp_plateau.yaml", tmp_path, "train.steps=24", "train.eval_every=2",
                  "train.log_every=1", "optimizer.reduce_on_plateau.patience=0",
                  "optimizer.reduce_on_plateau.rtol=0.1", "checkpoint.at_end=false")
    run_config(cfg)
    lr = {r["step"]: r["learning_rate"] for r in _log(tmp_path)}
    evals = [(r["step"], r["accuracy"]) for r in _log(tmp_path, "train/eval")]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5,
                                                       patience=0, threshold=0.1)
    expected = {1: 0.05, 2: 0.05}
    for step, accuracy in evals[:-1]:
        sched.step(accuracy)
        expected[step + 1] = expected[step + 2] = opt.param_groups[0]["lr"]
    assert len(set(expected.values())) > 2  # it did reduce, more than once
    assert lr == pytest.approx(expected, rel=1e-6)


def test_dp_sgd_from_config_reports_the_poisson_accountant_epsilon(tmp_path):
    """configs/digits_mlp_dp.yaml: batches are Poisson draws (their sizes vary around
    q * n), and the reported epsilon is dp_accounting's for the Poisson-sampled Gaussian
    mechanism at q = batch_size / n composed over the steps taken."""
    import dp_accounting

    cfg = _config("digits_mlp_dp.yaml", tmp_path, "train.steps=12", "train.log_every=1",
                  "train.eval_every=12", "checkpoint.at_end=false")
    summary = run_config(cfg)
    n = len(_data(cfg)["train"]["label"])
    q = 64 / n
    sizes = [r["batch_examples"] for r in _log(tmp_path)]
    assert len(set(sizes)) > 3 and abs(np.mean(sizes) - 64) < 4 * np.sqrt(64 / len(sizes))
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(1.1)), 12)
    assert summary["privacy"]["sampling_rate"] == pytest.approx(q)
    assert summary["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5),
                                                          rel=1e-9)
    assert summary["eval"]["accuracy"] > 0.2  # it learns through the noise (chance 0.1)


@pytest.mark.parametrize("override, message", [
    ("privacy.noise_multiplier=0", "'privacy.noise_multiplier' must be > 0"),
    ("privacy.delta=1", "'privacy.delta' must be in (0, 1)"),
    ("privacy.accountant=gdp", "'privacy.accountant' must be rdp or pld"),
    ("privacy.clip=1", "unknown config key 'privacy.clip'"),
    ("train.microbatches=2", "'train.microbatches' must be 1 with privacy"),
    ("train.precision=bfloat16", "'train.precision' must be float32 with privacy"),
])
def test_privacy_section_refuses_bad_values_in_one_line(override, message, tmp_path):
    from jaxtrain.errors import JaxtrainError

    with pytest.raises(JaxtrainError) as err:
        run_config(_config("digits_mlp_dp.yaml", tmp_path, override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_distillation_from_config_learns_from_a_teacher_checkpoint(tmp_path):
    """configs/digits_mlp_distill.yaml with a teacher trained here and a transfer set: the
    teacher rebuilt from its checkpoint scores the accuracy its run reported, and the
    student's first logged loss is torch's KL (batchmean) and cross-entropy, the latter
    over the labelled examples of the batch only."""
    torch = pytest.importorskip("torch")
    import jax

    from jaxtrain.data import batch_at
    from jaxtrain.models import registry
    from jaxtrain.strategies.distill import teacher_from_checkpoint, with_transfer_set

    teacher_dir = tmp_path / "teacher"
    teacher_run = run_config(_config("digits_mlp_distill.yaml", teacher_dir, "distill=null",
                                     "model.hidden=[64]", "train.steps=40",
                                     "train.eval_every=40"))
    data = _data(_config("digits_mlp_distill.yaml", teacher_dir, "distill=null"))
    teacher = teacher_from_checkpoint(teacher_dir / "checkpoints")
    predicted = np.argmax(np.asarray(teacher(data["valid"]["image"])), -1)
    assert np.mean(predicted == data["valid"]["label"]) == pytest.approx(
        teacher_run["eval"]["accuracy"], abs=1e-9)

    transfer = {"name": "digits", "test_fraction": 0.5, "seed": 1}
    cfg = _config("digits_mlp_distill.yaml", tmp_path / "student",
                  f"distill.teacher={teacher_dir / 'checkpoints'}", f"distill.transfer={transfer}",
                  "train.steps=2", "train.log_every=1", "train.eval_every=2",
                  "checkpoint.at_end=false")
    run_config(cfg)
    train = with_transfer_set(data["train"], _data_named(transfer)["train"], 0.1, 0)
    n = len(data["train"]["label"])
    assert len(train["label"]) == n + len(_data_named(transfer)["train"]["label"])
    assert train["labelled"][:n].sum() == round(0.1 * n) and not train["labelled"][n:].any()
    batch = batch_at(train, 64, 0, 0)
    student = registry.build("mlp", 0, hidden=[32])
    s = torch.tensor(np.asarray(jax.device_get(student(batch["image"]))), dtype=torch.float64)
    t = torch.tensor(np.asarray(teacher(batch["image"])), dtype=torch.float64)
    T, alpha = 4.0, 0.9
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1),
                                    reduction="batchmean")
    ce = torch.nn.functional.cross_entropy(s, torch.tensor(batch["label"]).long(),
                                           reduction="none")
    mask = torch.tensor(batch["labelled"], dtype=torch.float64)
    expected = alpha * T**2 * kl + (1 - alpha) * (ce * mask).sum() / mask.sum().clamp(min=1)
    first = _log(tmp_path / "student")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(expected), rel=1e-5)


def _data_named(spec: dict) -> dict:
    from jaxtrain.data import registry

    spec = dict(spec)
    return registry.load(spec.pop("name"), **spec)


def test_diloco_from_config_resumes_bitwise(tmp_path):
    """configs/digits_mlp_diloco.yaml on the 8 test devices: a run stopped after 2 rounds
    and resumed from its checkpoint to 4 rounds saves exactly the arrays (global and every
    replica's params, inner and outer optimizer states) of an uninterrupted 4-round run."""
    base = ["local_sgd.sync_every=4", "train.batch_size=64", "train.log_every=4",
            "checkpoint.async=false"]
    stopped = run_config(_config("digits_mlp_diloco.yaml", tmp_path / "a", *base,
                                 "train.steps=8"))
    assert stopped["step"] == 8
    resumed = run_config(_config("digits_mlp_diloco.yaml", tmp_path / "a", *base,
                                 "train.steps=16"))
    straight = run_config(_config("digits_mlp_diloco.yaml", tmp_path / "b", *base,
                                  "train.steps=16"))
    assert resumed["step"] == straight["step"] == 16
    # the second run continued from step 8: a restart would have saved step 8 again, which
    # the Manager refuses; the log holds each round once
    assert [r["step"] for r in _log(tmp_path / "a")] == [4, 8, 12, 16]
    a, b = _saved(tmp_path / "a"), _saved(tmp_path / "b")
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(a["local_params"]["head"]["kernel"]).shape[0] == 8  # one per replica
    losses = [r["loss"] for r in _log(tmp_path / "b")]
    assert losses[-1] < losses[0] and resumed["eval"] == straight["eval"]


def test_diloco_saves_and_ends_on_sigterm(tmp_path, monkeypatch):
    """SIGTERM during a local SGD run (sent after its first round) ends it after that
    round with a checkpoint of it, as the Trainer does; the handler is put back."""
    import os
    import signal

    from jaxtrain.checkpoint import Manager
    from jaxtrain.strategies import local_sgd_run

    make_round = local_sgd_run.make_local_sgd_round

    def signalling(*args):
        round_fn = make_round(*args)

        def first_then_signal(local, batches):
            out = round_fn(local, batches)
            os.kill(os.getpid(), signal.SIGTERM)
            return out

        return first_then_signal

    monkeypatch.setattr(local_sgd_run, "make_local_sgd_round", signalling)
    before = signal.getsignal(signal.SIGTERM)
    summary = run_config(_config("digits_mlp_diloco.yaml", tmp_path, "local_sgd.sync_every=4",
                                 "train.steps=16", "train.batch_size=64",
                                 "checkpoint.async=false"))
    assert summary["interrupted"] == "SIGTERM" and summary["step"] == 4
    assert Manager(tmp_path / "checkpoints", read_only=True).steps() == [4]
    assert signal.getsignal(signal.SIGTERM) is before


def test_diloco_evaluates_every_eval_every_and_reports_as_the_trainer_does(tmp_path, capsys,
                                                                          monkeypatch):
    """Local SGD evaluates at the end of the round in which the step reaches a multiple of
    train.eval_every (6 with rounds of 4: steps 8 and 12), and writes TensorBoard, the
    progress lines and the plots through the Trainer's `RunLogs` (before: one evaluation at
    the end, log.jsonl only). The plots are recorded, not drawn (the Trainer's tests draw
    them): curves.png gets the logged series, confusion.png the last evaluation's matrix."""
    from jaxtrain.train import run_logs

    drawn = {}
    monkeypatch.setattr(run_logs, "plot_history",
                        lambda series, path, title: drawn.setdefault(Path(path).name, series))
    monkeypatch.setattr(run_logs, "plot_confusion",
                        lambda matrix, path, title: drawn.setdefault(Path(path).name, matrix))
    summary = run_config(_config(
        "digits_mlp_diloco.yaml", tmp_path, "local_sgd.sync_every=4", "train.steps=12",
        "train.batch_size=64", "train.log_every=4", "train.eval_every=6",
        "checkpoint.async=false", "logging.tensorboard=true", "logging.plots=true",
        "logging.progress=true"))
    assert [r["step"] for r in _log(tmp_path, "train/eval")] == [8, 12]
    assert [r["step"] for r in _log(tmp_path)] == [4, 8, 12]
    assert summary["eval"] == {k: v for k, v in _log(tmp_path, "train/eval")[-1].items()
                               if k not in ("run", "step")}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in drawn["curves.png"]["eval"]] == [8, 12]
    assert np.asarray(drawn["confusion.png"]).sum() == 449  # every held-out digit
    assert "train: step 12/12 loss=" in capsys.readouterr().err


def test_diloco_early_stopping_stops_at_a_round_and_a_rerun_stays_stopped(tmp_path):
    """early_stopping with local SGD: patience 1 and a min_delta no evaluation can beat
    stop the run at its second evaluation (step 8 of 16), with a checkpoint there; a rerun
    reads early stopping's progress from it and stays stopped (before: ignored, 16 steps)."""
    from jaxtrain.checkpoint import Manager

    cfg = _config("digits_mlp_diloco.yaml", tmp_path, "local_sgd.sync_every=4",
                  "train.steps=16", "train.batch_size=64", "train.eval_every=4",
                  "early_stopping={patience: 1, min_delta: 100.0}", "checkpoint.async=false")
    first = run_config(cfg)
    assert first["step"] == 8 and first["stopped"].startswith(
        "early stopping: no improvement of accuracy for 1 evaluations (best ")
    assert Manager(tmp_path / "checkpoints", read_only=True).steps() == [8]
    again = run_config(cfg)
    assert (again["step"], again["stopped"], again["eval"]) == (8, first["stopped"],
                                                                first["eval"])
    assert [r["step"] for r in _log(tmp_path, "train/eval")] == [4, 8]


@pytest.mark.parametrize("override, key", [("checkpoint.best=true", "checkpoint.best"),
                                           ("train.nan_policy=skip", "train.nan_policy"),
                                           ("data.augment={crop: 1}", "data.augment")])
def test_diloco_refuses_what_a_round_cannot_do_in_one_line(override, key, tmp_path):
    from jaxtrain.errors import JaxtrainError

    with pytest.raises(JaxtrainError, match=f"^config key '{key}' .*local_sgd"):
        run_config(_config("digits_mlp_diloco.yaml", tmp_path, override))


@pytest.mark.parametrize("override", ["logging.mlflow={}", "logging.wandb={mode: offline}"])
def test_diloco_refuses_a_tracker_in_one_line(override, tmp_path):
    from jaxtrain.errors import JaxtrainError

    with pytest.raises(JaxtrainError, match=r"^config key 'logging\.(mlflow|wandb)' is not "
                                            r"supported with local_sgd"):
        run_config(_config("digits_mlp_diloco.yaml", tmp_path, override))


@pytest.mark.parametrize("name, key", [("digits_mlp_dp.yaml", "privacy"),
                                       ("digits_mlp_distill.yaml", "distill"),
                                       ("digits_mlp_diloco.yaml", "local_sgd")])
def test_tuning_refuses_strategy_sections_in_one_line(name, key, tmp_path):
    """sweep / compare / lr-find run the plain step: a strategy section is refused rather
    than silently left out."""
    from jaxtrain.errors import JaxtrainError
    from jaxtrain.tune.setup import problem_from_config

    with pytest.raises(JaxtrainError, match=f"config key '{key}' is not supported by the "
                                            "tuning commands"):
        problem_from_config(_config(name, tmp_path))
