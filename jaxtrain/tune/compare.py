"""Compare training strategies by measurement, a small AlgoPerf.

Method: every strategy (an optimizer spec) gets the same tuning budget: a grid of
learning rates, each trained with the same seeds and steps as one vmapped sweep. A
strategy's tuned rate is the one with the best mean final held-out metric over seeds.
At that rate we report the final and best held-out metric (mean and spread over
seeds), the steps to reach the target (median over seeds; the target is given, or else
95% of the way from the worst to the best strategy's mean final value), and the
wall time to the target: the sweep's measured time per step per run times those steps.
With `folds` (`jaxtrain compare --folds K`) every learning rate and seed is trained on K
folds of the training split (`jaxtrain.tune.crossval`): the tuned rate is the one with the
best mean over seeds and folds, and the figures are the folds' held-out ones.
With `lr_scales` every strategy's grid is the same relative grid around its own learning
rate (the spec's, else its optimizer's default), since rates of different optimizers live
on different scales (Muon's ~0.02, AdamW's ~1e-3). With `cache` each strategy's sweep is
saved as it finishes and reused when asked again for the same runs, so an interrupted
comparison resumes and a cut-off one still gives the table of what finished.
"""

from __future__ import annotations

import dataclasses
import dataclasses as dc
import inspect
import json
from pathlib import Path

import numpy as np

from ..errors import JaxtrainError
from ..train.logs import pyplot, save_figure
from ..transforms.spec import OPTIMIZERS
from ..transforms.spec import build as build_spec
from .crossval import fold_sets
from .runs import RunSpec
from .sweep import SweepResult, sweep

STRATEGIES: dict[str, dict] = {
    "sgd": {"optimizer": "sgd"},
    "momentum": {"optimizer": {"name": "sgd", "momentum": 0.9}},
    "nesterov": {"optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True}},
    "adagrad": {"optimizer": "adagrad"},
    "rmsprop": {"optimizer": "rmsprop"},
    "adam": {"optimizer": "adam"},
    "adamw": {"optimizer": "adamw", "weight_decay": 1e-4},
    "lion": {"optimizer": "lion"},
    "schedule_free": {"optimizer": "schedule_free_adamw"},
}
LR_GRIDS = {
    "sgd": [0.01, 0.03, 0.1, 0.3], "momentum": [0.003, 0.01, 0.03, 0.1],
    "nesterov": [0.003, 0.01, 0.03, 0.1], "adagrad": [0.003, 0.01, 0.03, 0.1],
    "lion": [3e-5, 1e-4, 3e-4, 1e-3],
}
DEFAULT_LR_GRID = [3e-4, 1e-3, 3e-3, 1e-2]


@dataclasses.dataclass
class StrategyResult:
    name: str
    learning_rate: float
    final: np.ndarray  # per seed
    best: np.ndarray  # per seed
    steps_to_target: float  # median over seeds; inf if not reached
    steps_per_seed: np.ndarray  # first evaluation step at the target per seed; inf: never
    seconds_to_target: float
    curve: list[tuple[int, float]]  # mean held-out monitored metric over seeds
    sweep: SweepResult


@dataclasses.dataclass
class Comparison:
    results: list[StrategyResult]
    monitor: str
    mode: str
    target: float
    seeds: list[int]
    steps: int
    folds: int | None = None  # cross-validated: the held-out figures are the folds'

    def table(self) -> str:
        """Per strategy at its tuned rate: the final and best held-out metric and the steps
        to the target, each the median [min, max] over seeds (a seed that never reached
        the target counts as infinitely many steps)."""
        head = ["strategy", "lr", f"final {self.monitor}", f"best {self.monitor}",
                "steps to target", "s to target"]
        spread = lambda v, f: f"{np.median(v):{f}} [{np.min(v):{f}}, {np.max(v):{f}}]"
        rows = []
        for r in self.results:
            reached = np.isfinite(r.steps_to_target)
            rows.append([r.name, f"{r.learning_rate:.3g}", spread(r.final, ".4f"),
                         spread(r.best, ".4f"),
                         spread(r.steps_per_seed, ".0f") if reached else "not reached",
                         f"{r.seconds_to_target:.2f}" if reached else "-"])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
        folds = f"; {self.folds} folds of the training split" if self.folds else ""
        lines.append(f"target {self.monitor} = {self.target:.4f}; seeds {self.seeds}{folds}; "
                     f"{self.steps} steps; learning rate tuned per strategy; "
                     "median [min, max] over seeds")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Left: each strategy's final held-out metric against its learning rates (mean
        over seeds, their range shaded), the tuned rate starred, the target dotted.
        Right: at the tuned rates, the held-out curves (mean over seeds; markers when
        few), or the training loss per step when runs were evaluated once."""
        plt = pyplot()

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, r in enumerate(self.results):
            c = f"C{i % 10}"
            rates = sorted({p["learning_rate"] for p in r.sweep.points})
            final = r.sweep.final()
            rows = [[p["learning_rate"] == lr for p in r.sweep.points] for lr in rates]
            mean = [np.nanmean(final[m]) for m in rows]
            left.plot(rates, mean, "o-", color=c, label=r.name)
            left.fill_between(rates, [np.nanmin(final[m]) for m in rows],
                              [np.nanmax(final[m]) for m in rows], color=c, alpha=0.15)
            left.plot([r.learning_rate], [r.final.mean()], "*", color=c, ms=14)
            tuned = np.array([p["learning_rate"] == r.learning_rate for p in r.sweep.points])
            if len(r.sweep.eval_steps) > 1:
                steps, values = r.sweep.eval_steps, r.sweep.evals[self.monitor][tuned]
            else:
                steps = np.arange(1, r.sweep.train_loss.shape[1] + 1)
                values = r.sweep.train_loss[tuned]
            right.plot(steps, values.mean(0), color=c, marker="o" if len(steps) <= 30 else None,
                       ms=3, label=f"{r.name} (lr {r.learning_rate:.3g})")
        left.axhline(self.target, color="k", ls=":", lw=1, label=f"target {self.target:.4g}")
        left.set_xscale("log")
        left.set_xlabel("learning rate")
        left.set_ylabel(f"final held-out {self.monitor}")
        left.set_title(f"tuning: mean and range over seeds {self.seeds}; * tuned")
        once = all(len(r.sweep.eval_steps) == 1 for r in self.results)
        right.set_ylabel("training loss" if once else f"held-out {self.monitor}")
        if once or self.mode == "min":
            right.set_yscale("log")
        right.set_xlabel("step")
        right.set_title("at the tuned learning rates, mean over seeds")
        for ax in (left, right):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        return save_figure(fig, path, dpi=110)


def strategy_spec(strategy) -> dict:
    """The optimizer spec of a strategy: a preset of `STRATEGIES`, the name of any optimizer
    of `jaxtrain.transforms`, or a spec (a dict, as `jaxtrain.transforms.spec.build`)."""
    if isinstance(strategy, dict):
        return dict(strategy)
    if strategy in STRATEGIES:
        return dict(STRATEGIES[strategy])
    if strategy in OPTIMIZERS:
        return {"optimizer": strategy}
    import difflib

    valid = [*STRATEGIES, *sorted(set(OPTIMIZERS) - set(STRATEGIES))]
    close = difflib.get_close_matches(str(strategy), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise JaxtrainError(f"unknown strategy {strategy!r}{hint}; valid: a preset "
                        f"({', '.join(STRATEGIES)}), any optimizer of jaxtrain.transforms "
                        f"({', '.join(sorted(OPTIMIZERS))}) or a spec mapping")


def lr_grid(name: str, spec: dict, scales) -> list[float]:
    """`scales` times the strategy's own learning rate: its spec's `learning_rate`, else
    the default of its optimizer's factory (e.g. soap's 3e-3)."""
    center = spec.get("learning_rate")
    if center is None:
        opt = spec["optimizer"]
        factory = OPTIMIZERS.get(opt if isinstance(opt, str) else opt.get("name"))
        if factory is not None:
            center = inspect.signature(factory).parameters["learning_rate"].default
    if isinstance(center, bool) or not isinstance(center, int | float) or center <= 0:
        raise JaxtrainError(f"strategy {name!r}: learning-rate scales need a rate to scale "
                            "and its optimizer has no default one; give its spec one, e.g. "
                            f"{name}={{optimizer: ..., learning_rate: 1e-3}}")
    return [float(center) * float(s) for s in scales]


def _save_sweep(path: Path, key: str, result: SweepResult) -> None:
    """`result`'s curves and timings (not its params) with the `key` of the runs."""
    arrays = {f"evals/{k}": v for k, v in result.evals.items()}
    arrays.update({f"test/{k}": v for k, v in (result.test or {}).items()})
    meta = {"key": key, "points": result.points, "monitor": result.monitor,
            "mode": result.mode, "compile_seconds": result.compile_seconds,
            "run_seconds": result.run_seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")  # never a half-written file under the final name
    np.savez(tmp, meta=json.dumps(meta), train_loss=result.train_loss,
             eval_steps=result.eval_steps, **arrays)
    tmp.replace(path)


def _load_sweep(path: Path, key: str) -> SweepResult | None:
    """The sweep saved at `path` if it was run with `key`, else None."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        if meta["key"] != key:
            return None
        part = lambda prefix: {k[len(prefix):]: saved[k] for k in saved.files
                               if k.startswith(prefix)}
        return SweepResult(points=meta["points"], train_loss=saved["train_loss"],
                           evals=part("evals/"), eval_steps=saved["eval_steps"],
                           monitor=meta["monitor"], mode=meta["mode"],
                           compile_seconds=meta["compile_seconds"],
                           run_seconds=meta["run_seconds"], test=part("test/") or None)


def _first_reaching(values: np.ndarray, steps: np.ndarray, target: float, mode: str) -> float:
    hit = values >= target if mode == "max" else values <= target
    return float(steps[np.argmax(hit)]) if hit.any() else float("inf")


def compare(spec: RunSpec, strategies, train: dict, valid: dict, steps: int,
            seeds=(0, 1), lr_grids: dict | None = None, target: float | None = None,
            devices=None, progress: bool = True, folds: int | None = None,
            fold_seed: int = 0, lr_scales=None, cache: str | Path | None = None,
            problem_key=None) -> Comparison:
    """Tune and run every strategy on the problem of `spec` (see the module docstring).
    `strategies`: names (see `strategy_spec`), or {label: name or spec}; `folds`: K-fold
    cross-validation on `train` (`fold_sets(train, folds, fold_seed)`) instead of
    `valid`. A strategy's rates: `lr_grids[label]`, else `lr_scales` (see `lr_grid`), else
    `LR_GRIDS` by label, else `DEFAULT_LR_GRID`. `cache`: a folder where each strategy's
    sweep is saved (`<label>.npz`) and reused if it was run with the same spec, rates,
    seeds, steps, folds and `problem_key` (JSON text naming the problem: model, data,
    batch size...; the caller's, since `spec` holds functions)."""
    if not strategies:
        raise JaxtrainError("give at least one strategy")
    if not isinstance(strategies, dict):
        strategies = {name: name for name in strategies}
    specs = {label: strategy_spec(s) for label, s in strategies.items()}
    sets = None if folds is None else fold_sets(train, folds, fold_seed)
    sweeps = {}
    for name, opt in specs.items():
        rates = (lr_grids or {}).get(name) or (lr_grid(name, opt, lr_scales) if lr_scales
                                                else LR_GRIDS.get(name, DEFAULT_LR_GRID))
        grid = {"learning_rate": [float(r) for r in rates], "seed": [int(s) for s in seeds]}
        try:
            tx = build_spec({**opt, "learning_rate": grid["learning_rate"][0]})
        except JaxtrainError as err:
            raise JaxtrainError(f"strategy {name!r}: {err}") from None
        key = json.dumps({"spec": opt, "grid": grid, "steps": steps, "folds": folds,
                          "fold_seed": fold_seed, "problem": problem_key},
                         sort_keys=True, default=str)
        path = None if cache is None else Path(cache) / f"{name}.npz"
        saved = None if path is None else _load_sweep(path, key)
        if progress:
            print(f"compare: {name}: {len(grid['learning_rate'])} learning rates x "
                  f"{len(seeds)} seeds{' (saved runs)' if saved else ''}", flush=True)
        sweeps[name] = saved or sweep(dc.replace(spec, tx=tx), grid, train, valid, steps,
                                      devices=devices, progress=progress, folds=sets)
        if path is not None and saved is None:
            _save_sweep(path, key, sweeps[name])
    mode, monitor = spec.task.mode, spec.task.monitor
    pick = np.argmax if mode == "max" else np.argmin
    tuned = {}
    for name, result in sweeps.items():
        rates = sorted({p["learning_rate"] for p in result.points})
        final = result.final()
        means = [np.nanmean(final[[p["learning_rate"] == lr for p in result.points]])
                 for lr in rates]
        means = np.where(np.isfinite(means), means, -np.inf if mode == "max" else np.inf)
        tuned[name] = rates[int(pick(means))]
    if target is None:
        means = np.array([np.nanmean(sweeps[n].final()[[p["learning_rate"] == tuned[n]
                                                        for p in sweeps[n].points]])
                          for n in sweeps])
        means = means[np.isfinite(means)]
        best, worst = (means.max(), means.min()) if mode == "max" else (means.min(),
                                                                        means.max())
        target = float(worst + 0.95 * (best - worst))
    results = []
    for name, result in sweeps.items():
        rows = np.array([p["learning_rate"] == tuned[name] for p in result.points])
        values = result.evals[monitor][rows]
        hits = np.array([_first_reaching(v, result.eval_steps, target, mode) for v in values])
        steps_to = float(np.median(hits))
        per_step_run = result.run_seconds / steps / len(result.points)
        results.append(StrategyResult(
            name=name, learning_rate=tuned[name], final=values[:, -1],
            best=values.max(1) if mode == "max" else values.min(1),
            steps_to_target=steps_to, steps_per_seed=hits,
            seconds_to_target=steps_to * per_step_run,
            curve=list(zip(result.eval_steps.tolist(), values.mean(0).tolist(), strict=True)),
            sweep=result))
    return Comparison(results, monitor, mode, target, list(seeds), steps, folds)
