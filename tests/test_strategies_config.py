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

    model = dict(cfg["model"])
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
    data_cfg = dict(cfg["data"])
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
