"""K-fold cross-validation of a hyperparameter grid: every point trained on K folds.

The folds are scikit-learn's: `StratifiedKFold` where the training set has integer
`label`s (each fold keeps the class proportions, as scikit-learn's `cross_val_score`
does for a classifier), `KFold` otherwise, both shuffled by the seed, so a config and a
seed always give the same folds. All points x folds runs train side by side in one
vmapped program (`sweep(..., folds=...)`); a point is chosen by its mean held-out metric
over the folds and reported with the folds' spread (standard deviation, as
scikit-learn's `GridSearchCV` reports `std_test_score`) and the mean over its K models
of the config's own held-out split, which no fold saw (the test metric).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import JaxtrainError
from ..train.logs import pyplot, save_figure
from .runs import RunSpec
from .sweep import SweepResult, marked_table, sweep


def fold_sets(train: dict, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` pairs of (training rows, held-out rows) of `train` (a dict of arrays)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(next(iter(train.values())))
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= n:
        raise JaxtrainError(f"--folds must be an integer from 2 to the {n} training "
                            f"examples, got {folds!r}")
    labels = train.get("label")
    stratify = labels is not None and np.asarray(labels).ndim == 1 and np.issubdtype(
        np.asarray(labels).dtype, np.integer)
    if stratify:
        counts = np.bincount(np.asarray(labels))
        smallest = int(counts[counts > 0].min())
        if smallest < folds:
            raise JaxtrainError(f"--folds {folds}: a class has only {smallest} training "
                                f"examples, fewer than the folds; use --folds {smallest} "
                                "or fewer")
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(folds, shuffle=True, random_state=seed)
    return [(a.astype(np.int32), b.astype(np.int32))
            for a, b in splitter.split(np.zeros(n), labels if stratify else None)]


@dataclasses.dataclass
class CrossValidation:
    """A sweep over points x folds, read per point."""

    result: SweepResult  # runs point-major: point 0 fold 0..K-1, point 1 ...
    folds: int

    @property
    def points(self) -> list[dict]:
        return [{k: v for k, v in p.items() if k != "fold"}
                for p in self.result.points[::self.folds]]

    def per_fold(self, metric: str | None = None) -> np.ndarray:
        """(points, folds): each fold's final held-out metric."""
        return self.result.final(metric).reshape(-1, self.folds)

    def mean(self, metric: str | None = None) -> np.ndarray:
        return self.per_fold(metric).mean(1)

    def spread(self, metric: str | None = None) -> np.ndarray:
        """Standard deviation over the folds (ddof 0, as scikit-learn's GridSearchCV)."""
        return self.per_fold(metric).std(1)

    def test(self, metric: str | None = None) -> np.ndarray:
        """(points,): the config's held-out metric, mean over each point's K models."""
        values = self.result.test[metric or self.result.monitor]
        return values.reshape(-1, self.folds).mean(1)

    def best_index(self) -> int:
        """The point with the best mean held-out metric (non-finite counts as worst)."""
        mean, high = self.mean(), self.result.mode == "max"
        mean = np.where(np.isfinite(mean), mean, -np.inf if high else np.inf)
        return int(np.argmax(mean) if high else np.argmin(mean))

    def table(self) -> str:
        monitor = self.result.monitor
        names = list(self.points[0])
        head = [*names, *(f"fold {f + 1}" for f in range(self.folds)), f"mean {monitor}",
                "std", f"test {monitor}"]
        rows = [[*(f"{p[n]:.4g}" for n in names), *(f"{v:.4f}" for v in folds),
                 f"{m:.4f}", f"{s:.4f}", f"{t:.4f}"]
                for p, folds, m, s, t in zip(self.points, self.per_fold(), self.mean(),
                                             self.spread(), self.test(), strict=True)]
        return marked_table(head, rows, self.best_index())

    def rows(self) -> list[dict]:
        """One JSON-ready mapping per point: its values, per-fold metric, mean, std, test."""
        return [{**p, "folds": [float(v) for v in folds], "mean": float(m), "std": float(s),
                 "test": float(t)}
                for p, folds, m, s, t in zip(self.points, self.per_fold(), self.mean(),
                                             self.spread(), self.test(), strict=True)]

    def plot(self, path: str | Path) -> Path:
        """The mean held-out metric over the folds against the first swept value, the
        folds' spread shaded (one standard deviation), each fold a dot, the test metric
        dashed, the chosen point starred; one line per value of the other swept names."""
        plt = pyplot()
        monitor, first = self.result.monitor, list(self.points[0])[0]
        others = lambda p: tuple((n, p[n]) for n in p if n != first)
        per_fold, mean, spread, test = self.per_fold(), self.mean(), self.spread(), self.test()
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for c, group in enumerate(sorted({others(p) for p in self.points})):
            at = sorted((i for i, p in enumerate(self.points) if others(p) == group),
                        key=lambda i: self.points[i][first])
            xs = np.array([self.points[i][first] for i in at], float)
            name = ", ".join(f"{n}={v:.3g}" for n, v in group)
            color = f"C{c % 10}"
            ax.plot(xs, mean[at], "o-", color=color, label=f"{name} mean of folds".strip())
            ax.fill_between(xs, mean[at] - spread[at], mean[at] + spread[at], color=color,
                            alpha=0.15)
            ax.plot(np.repeat(xs, self.folds), per_fold[at].ravel(), ".", color=color,
                    alpha=0.5)
            ax.plot(xs, test[at], "s--", color=color, alpha=0.6, ms=4,
                    label=f"{name} test".strip())
        best = self.best_index()
        ax.plot([self.points[best][first]], [mean[best]], "*", color="k", ms=16,
                label="chosen: " + ", ".join(f"{n}={v:.3g}" for n, v in
                                             self.points[best].items()))
        values = np.array([p[first] for p in self.points], float)
        if first == "learning_rate" or (values.min() > 0 and values.max() / values.min() > 20):
            ax.set_xscale("log")
        ax.set_xlabel(first)
        ax.set_ylabel(f"held-out {monitor}")
        ax.set_title(f"{self.folds}-fold cross-validation after "
                     f"{int(self.result.eval_steps[-1])} steps (band: one std over folds)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        return save_figure(fig, path, dpi=110)


def cross_validate(spec: RunSpec, grid: dict, train: dict, valid: dict, steps: int,
                   folds: int, seed: int = 0, devices=None,
                   progress: bool = True) -> CrossValidation:
    """Every point of `grid` trained for `steps` steps on each of `folds` folds of `train`
    (`fold_sets(train, folds, seed)`), evaluated on the fold's held-out rows and on
    `valid`."""
    sets = fold_sets(train, folds, seed)
    return CrossValidation(sweep(spec, grid, train, valid, steps, devices, progress,
                                 folds=sets), folds)
