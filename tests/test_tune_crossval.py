"""Cross-validation of a grid: the folds are scikit-learn's index sets (StratifiedKFold
for labels, KFold otherwise), and each fold's run in the vmapped program gives what a
plain sweep trained on that fold's rows and evaluated on its held-out rows gives."""

import numpy as np
import pytest
from sklearn.model_selection import KFold, StratifiedKFold

from jaxtrain import JaxtrainError, transforms
from jaxtrain.data.digits import digits_split
from jaxtrain.models.registry import build
from jaxtrain.train.tasks import get_task
from jaxtrain.tune.crossval import cross_validate, fold_sets
from jaxtrain.tune.runs import RunSpec
from jaxtrain.tune.sweep import sweep


def test_folds_are_sklearns_and_deterministic():
    y = np.repeat(np.arange(3), [5, 7, 9]).astype(np.int32)
    sets = fold_sets({"image": np.zeros((21, 2)), "label": y}, 4, seed=3)
    want = StratifiedKFold(4, shuffle=True, random_state=3).split(np.zeros(21), y)
    for (a, b), (c, d) in zip(sets, want, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    regression = fold_sets({"x": np.zeros((10, 2)), "y": np.zeros((10, 1))}, 3, seed=1)
    want = KFold(3, shuffle=True, random_state=1).split(np.zeros(10))
    assert all(np.array_equal(b, d) for (_, b), (_, d) in zip(regression, want, strict=True))
    for bad, message in [(1, "integer from 2 to the 21"), (6, "a class has only 5")]:
        with pytest.raises(JaxtrainError, match=message):
            fold_sets({"image": np.zeros((21, 2)), "label": y}, bad)


def test_each_fold_run_equals_a_sweep_on_that_fold():
    train, valid = digits_split((0, 1, 2), 0.25, 0)
    train = {k: v[:241] for k, v in train.items()}  # folds of 81, 80, 80: one padded
    spec = RunSpec(lambda s: build("mlp", s, in_features=64, hidden=[16], out_features=3),
                   get_task("classification"), transforms.adam(1e-2), 16, 6)
    grid = {"learning_rate": [3e-3, 3e-2]}
    cv = cross_validate(spec, grid, train, valid, 6, folds=3, seed=0, progress=False)
    assert cv.per_fold().shape == (2, 3) and len(cv.points) == 2
    want = StratifiedKFold(3, shuffle=True, random_state=0).split(train["image"],
                                                                    train["label"])
    for fold, (rows, held) in enumerate(want):
        alone = sweep(spec, grid, {k: v[rows] for k, v in train.items()},
                      {k: v[held] for k, v in train.items()}, 6, progress=False)
        np.testing.assert_allclose(cv.per_fold()[:, fold], alone.final(), rtol=1e-5)
        np.testing.assert_allclose(cv.per_fold("loss")[:, fold], alone.final("loss"),
                                   rtol=1e-5)
    per_fold = cv.per_fold()
    np.testing.assert_allclose(cv.mean(), per_fold.mean(1))
    np.testing.assert_allclose(cv.spread(), per_fold.std(1))
    assert cv.best_index() == int(np.argmax(per_fold.mean(1)))
    assert 0 <= cv.test().min() and cv.test().max() <= 1
    table = cv.table()
    assert "fold 3" in table and "<- best" in table and "test accuracy" in table


def test_sweep_folds_from_the_command_line(tmp_path, capsys):
    """`jaxtrain sweep --folds K` prints per-fold metrics with mean, std and test, and
    writes them as JSON with the plot; a bad K is refused in one line."""
    import json

    import yaml

    from jaxtrain.cli import main

    config = tmp_path / "cv.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 1, "out": str(tmp_path), "task": "classification",
        "model": {"name": "mlp", "hidden": [8]},
        "data": {"name": "digits", "classes": [0, 1]},
        "optimizer": {"optimizer": "adam", "learning_rate": 0.01},
        "train": {"steps": 3, "batch_size": 16}}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--folds", "2", "--grid", "learning_rate=0.01,0.1",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fold 2" in printed and "by mean held-out accuracy over 2 folds" in printed
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["folds"] == 2 and saved["fold_seed"] == 1 and len(saved["points"]) == 2
    row = saved["points"][0]
    assert row["mean"] == pytest.approx(np.mean(row["folds"]), rel=1e-6)
    assert row["std"] == pytest.approx(np.std(row["folds"]), rel=1e-5)
    assert (out / "sweep.png").stat().st_size > 0
    assert main(["sweep", str(config), "--folds", "1", "--out", str(out), "--quiet"]) == 2
    assert "--folds must be an integer from 2" in capsys.readouterr().err


def test_compare_tunes_each_strategy_on_the_folds():
    """`compare(..., folds=K)`: the tuned rate is the best mean over the K folds' held-out
    metrics, and the strategy's figures are those folds' values."""
    from jaxtrain.tune.compare import compare

    train, valid = digits_split((0, 1), 0.25, 0)
    spec = RunSpec(lambda s: build("mlp", s, in_features=64, hidden=[8], out_features=2),
                   get_task("classification"), transforms.adam(1e-2), 16, 4)
    rates = [1e-3, 3e-2]
    result = compare(spec, ["adam"], train, valid, 4, seeds=(0,), lr_grids={"adam": rates},
                     progress=False, folds=2, fold_seed=0)
    tuned = result.results[0]
    assert [p["fold"] for p in tuned.sweep.points] == [0, 1, 0, 1]
    per_fold = tuned.sweep.final().reshape(2, 2)  # (rates, folds)
    chosen = int(np.argmax(per_fold.mean(1)))
    assert tuned.learning_rate == rates[chosen]
    np.testing.assert_array_equal(tuned.final, per_fold[chosen])
    assert "seeds [0]; 2 folds of the training split" in result.table()
