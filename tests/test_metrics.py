"""Evaluation beyond accuracy: precision, recall, F1 and the confusion matrix of a
classifier (checked against scikit-learn on the same predictions), a language model's
perplexity, and their way through the Trainer's evaluations and a config run's summary."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn import metrics as skm

from jaxtrain import sharding, transforms
from jaxtrain.config import load
from jaxtrain.data import eval_batches
from jaxtrain.models.registry import build
from jaxtrain.train import (
    LoggingConfig,
    TrainConfig,
    Trainer,
    TrainerConfig,
    TrainState,
    classification_loss,
    make_eval_step,
)
from jaxtrain.train.config import RunConfig
from jaxtrain.train.metrics import (
    classification_report,
    precision_recall_f1,
    summarize_eval,
)
from jaxtrain.train.run import run_config
from jaxtrain.train.tasks import get_task


def _sklearn(labels, predictions, k):
    per = skm.precision_recall_fscore_support(labels, predictions, labels=range(k),
                                              zero_division=0)
    macro = skm.precision_recall_fscore_support(labels, predictions, average="macro",
                                                zero_division=0)
    return per, macro, skm.confusion_matrix(labels, predictions, labels=range(k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_f1_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 6
    labels = rng.integers(0, k - 1, 200)  # class 5 never true ...
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, k, 200))
    predictions[predictions == 4] = 3  # ... class 4 never predicted
    (p, r, f, support), (pm, rm, fm, _), confusion = _sklearn(labels, predictions, k)
    ours = precision_recall_f1(confusion)
    np.testing.assert_allclose(ours["precision_per_class"], p, atol=1e-12)
    np.testing.assert_allclose(ours["recall_per_class"], r, atol=1e-12)
    np.testing.assert_allclose(ours["f1_per_class"], f, atol=1e-12)
    np.testing.assert_array_equal(ours["support"], support)
    assert ours["precision_macro"] == pytest.approx(pm, abs=1e-12)
    assert ours["recall_macro"] == pytest.approx(rm, abs=1e-12)
    assert ours["f1_macro"] == pytest.approx(fm, abs=1e-12)


def test_macro_skips_classes_neither_true_nor_predicted_like_sklearn():
    labels, predictions = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    ours = precision_recall_f1(skm.confusion_matrix(labels, predictions, labels=range(4)))
    assert ours["f1_macro"] == pytest.approx(skm.f1_score(labels, predictions,
                                                          average="macro"))
    assert ours["f1_per_class"][2:].tolist() == [0.0, 0.0]


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.l = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.l(x)


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"image": x, "label": (x[:, :4].argmax(1)).astype(np.int32)}


def test_eval_step_sums_confusion_under_the_padding_mask():
    """Batches of 32 over 50 examples: the padded rows must not count."""
    model = Linear(nnx.Rngs(1))
    state = TrainState.create(model, transforms.sgd(0.1), jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(data=-1)
    step = jax.jit(make_eval_step(classification_report))
    data = _data(50, 3)
    totals = {}
    for batch in eval_batches(data, 32, multiple_of=sharding.batch_parallelism(mesh)):
        for key, value in jax.device_get(step(state, batch)).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    scalars, arrays = summarize_eval(classification_report, totals)
    predictions = np.asarray(model(data["image"])).argmax(1)
    (p, r, f, _), (pm, rm, fm, _), confusion = _sklearn(data["label"], predictions, 4)
    np.testing.assert_array_equal(arrays["confusion"], confusion)
    np.testing.assert_allclose(arrays["f1_per_class"], f, atol=1e-12)
    assert scalars["accuracy"] == pytest.approx(skm.accuracy_score(data["label"], predictions))
    assert scalars["f1_macro"] == pytest.approx(fm, abs=1e-12)
    assert scalars["precision_macro"] == pytest.approx(pm, abs=1e-12)
    assert scalars["recall_macro"] == pytest.approx(rm, abs=1e-12)


def test_trainer_reports_f1_and_writes_the_confusion_png(tmp_path):
    state = TrainState.create(Linear(nnx.Rngs(0)), transforms.adam(1e-2),
                              jax.random.PRNGKey(0))
    task = get_task("classification")
    config = TrainerConfig(train=TrainConfig(batch_size=16, eval_batch_size=24),
                           log_dir=tmp_path, monitor="f1_macro", mode="max",
                           logging=LoggingConfig(tensorboard=False, progress=False))
    trainer = Trainer(state, classification_loss, config, metric_fn=task.metric_fn,
                      mesh=sharding.make_mesh(data=1, devices=jax.devices()[:1]))
    valid = _data(40, 1)
    state = trainer.fit(_data(96, 0), 20, eval_data=valid, eval_every=10)
    model = state.model(train=False)
    predictions = np.asarray(model(valid["image"])).argmax(1)
    f1 = skm.f1_score(valid["label"], predictions, average="macro", zero_division=0)
    assert trainer.last_eval["f1_macro"] == pytest.approx(f1, abs=1e-9)
    assert trainer.best == max(m["f1_macro"] for _, m in trainer.eval_history)
    np.testing.assert_array_equal(trainer.last_eval_arrays["confusion"],
                                  skm.confusion_matrix(valid["label"], predictions,
                                                       labels=range(4)))
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def test_language_model_task_reports_perplexity():
    """exp of the per-token cross-entropy, computed here with optax on the same logits."""
    model = build("gpt", vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_len=16)
    state = TrainState.create(model, transforms.sgd(0.1), jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, 32, (6, 13)).astype(np.int32)
    metric_fn = get_task("language_model").metric_fn
    sums = jax.device_get(jax.jit(make_eval_step(metric_fn))(state, {"tokens": tokens}))
    scalars, _ = summarize_eval(metric_fn, sums)
    token_losses = optax.softmax_cross_entropy_with_integer_labels(
        model(tokens[:, :-1]), tokens[:, 1:])
    assert scalars["perplexity"] == pytest.approx(math.exp(float(token_losses.mean())),
                                                  rel=1e-5)


def test_classification_config_run_summary_has_per_class_values(tmp_path):
    cfg = load(RunConfig, {
        "out": str(tmp_path), "task": "classification",
        "model": {"name": "mlp", "in_features": [8, 8], "hidden": [16], "out_features": 3},
        "data": {"name": "digits", "classes": [0, 1, 2]},
        "optimizer": {"optimizer": "adam", "learning_rate": 0.01},
        "train": {"steps": 5, "batch_size": 16},
        "logging": {"tensorboard": False, "plots": True, "progress": False},
        "checkpoint": {"at_end": False},
    })
    summary = run_config(cfg)
    arrays = summary["eval_arrays"]
    assert np.asarray(arrays["confusion"]).shape == (3, 3)
    assert sum(map(sum, arrays["confusion"])) == sum(arrays["support"])
    assert 0.0 <= summary["eval"]["f1_macro"] <= 1.0
    assert (tmp_path / "confusion.png").exists()
