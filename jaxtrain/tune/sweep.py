"""A hyperparameter grid trained as one vmapped, jitted program.

Every grid point is a whole training run; their states are stacked on a leading axis and
advanced together (`jax.vmap`), sharded over the devices along a `sweep` mesh axis, one
`eval_every`-step chunk (a `lax.scan`) per compiled call, then a held-out evaluation;
runs of `steps` not a multiple of `eval_every` end with a shorter chunk and one more
evaluation. On CPU a model with a convolution takes one step per call instead (XLA:CPU
runs convolutions in loops ~24x slower, and unrolling a long chunk compiles slowly).
`seed` in the grid varies the init and the data order; every other name sets an injected
hyperparameter of the optimizer. With `folds` (cross-validation, `jaxtrain.tune.crossval`)
every point is trained once per fold, all runs side by side in the same program.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import JaxtrainError
from ..train import Progress
from ..train.logs import pyplot, save_figure
from .runs import (
    RunSpec,
    batch_indices,
    conv_on_cpu,
    initial_state,
    injected_names,
    make_rows_evaluate,
    make_runner,
)


def expand_grid(grid: dict) -> list[dict]:
    """The cartesian product of `grid` (name -> list of values) as a list of points."""
    if not isinstance(grid, dict) or not grid:
        raise JaxtrainError("the sweep grid must be a non-empty mapping of name -> values")
    for name, values in grid.items():
        if not isinstance(values, list | tuple) or not values:
            raise JaxtrainError(f"grid {name!r} must be a non-empty list of values, "
                                f"got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise JaxtrainError(f"grid {name!r} holds {v!r}: values must be finite numbers")
        if name == "seed" and any(not float(v).is_integer() or v < 0 for v in values):
            raise JaxtrainError(f"grid 'seed' values must be integers >= 0, got {values}")
        if name == "learning_rate" and any(v <= 0 for v in values):
            raise JaxtrainError(f"grid 'learning_rate' values must be > 0, got {values}")
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]


def marked_table(head: list[str], rows: list[list[str]], best: int) -> str:
    """Right-aligned columns under `head`, the row `best` marked `<- best`."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    for i, r in enumerate(rows):
        mark = "  <- best" if i == best else ""
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + mark)
    return "\n".join(lines)


@dataclasses.dataclass
class SweepResult:
    """Curves of every grid point: training loss per step, held-out metrics per eval."""

    points: list[dict]
    train_loss: np.ndarray  # (points, steps)
    evals: dict[str, np.ndarray]  # metric -> (points, evaluations)
    eval_steps: np.ndarray
    monitor: str
    mode: str
    compile_seconds: float
    run_seconds: float
    params: object = None  # final params, stacked over points
    test: dict | None = None  # with folds: metric -> (points,) on `valid`, after the last step

    def final(self, metric: str | None = None) -> np.ndarray:
        return self.evals[metric or self.monitor][:, -1]

    def best(self, metric: str | None = None) -> np.ndarray:
        values = self.evals[metric or self.monitor]
        return values.max(1) if self.mode == "max" else values.min(1)

    def best_index(self) -> int:
        """The point with the best final monitored metric (non-finite counts as worst)."""
        final = self.final()
        bad = -np.inf if self.mode == "max" else np.inf
        final = np.where(np.isfinite(final), final, bad)
        return int(np.argmax(final) if self.mode == "max" else np.argmin(final))

    def table(self) -> str:
        names = list(self.points[0])
        head = [*names, f"final {self.monitor}", f"best {self.monitor}", "final loss"]
        rows = [
            [*(f"{p[n]:.4g}" for n in names), f"{f:.4f}", f"{b:.4f}", f"{loss:.4f}"]
            for p, f, b, loss in zip(self.points, self.final(), self.best(),
                                     self.evals["loss"][:, -1], strict=True)
        ]
        return marked_table(head, rows, self.best_index())

    def plot(self, path: str | Path) -> Path:
        """Left: the final (line) and best (dashed) held-out metric against the swept
        value, mean over seeds with their range shaded, the best point starred (one line
        per value of a second swept name); log axis for rates and wide ranges. Right:
        every run's held-out curve (markers when there are few evaluations), or its
        training loss per step when it was evaluated once."""
        plt = pyplot()

        names = [n for n in self.points[0] if n != "seed"]
        x_name = names[0] if names else "seed"
        lines_by = names[1] if len(names) > 1 else None
        final, best = self.final(), self.best()
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        groups = sorted({p.get(lines_by) for p in self.points}, key=lambda v: (v is None, v))
        for color, group in enumerate(groups):
            rows = [i for i, p in enumerate(self.points) if p.get(lines_by) == group]
            xs = sorted({self.points[i][x_name] for i in rows})
            stats = []
            for x in xs:
                at = [i for i in rows if self.points[i][x_name] == x]
                stats.append([np.nanmean(final[at]), np.nanmin(final[at]),
                              np.nanmax(final[at]), np.nanmean(best[at])])
            mean, lo, hi, best_mean = np.array(stats).T
            label = "" if lines_by is None else f"{lines_by}={group:.3g}: "
            c = f"C{color % 10}"
            left.plot(xs, mean, "o-", color=c, label=f"{label}final")
            if len(self.eval_steps) > 1:  # else the best is the final
                left.plot(xs, best_mean, "s--", color=c, alpha=0.6, ms=4,
                          label=f"{label}best")
            if len(set(p.get("seed", 0) for p in self.points)) > 1:
                left.fill_between(xs, lo, hi, color=c, alpha=0.15)
        top = self.points[self.best_index()]
        at = [i for i, p in enumerate(self.points)
              if all(p[n] == top[n] for n in names)]
        left.plot([top[x_name]], [np.nanmean(final[at])], "*", color="k", ms=16,
                  label=f"best: {', '.join(f'{n}={top[n]:.3g}' for n in names) or 'seed'}")
        values = np.array([p[x_name] for p in self.points], float)
        if x_name == "learning_rate" or (values.min() > 0 and values.max() / values.min() > 20):
            left.set_xscale("log")
        seeds = sorted({p.get("seed", 0) for p in self.points})
        left.set_xlabel(x_name)
        left.set_ylabel(f"held-out {self.monitor}")
        left.set_title(f"after {int(self.eval_steps[-1])} steps"
                       + (f"; mean and range over seeds {seeds}" if len(seeds) > 1 else ""))
        left.grid(True, alpha=0.3)
        left.legend(fontsize="small")

        label = lambda p: ", ".join(f"{k}={v:.3g}" for k, v in p.items())
        if len(self.eval_steps) > 1:
            steps, values, what = self.eval_steps, self.evals[self.monitor], \
                f"held-out {self.monitor}"
            log = self.mode == "min"
        else:  # one evaluation is one point per run: show the training loss instead
            steps, values, what = np.arange(1, self.train_loss.shape[1] + 1), \
                self.train_loss, "training loss"
            log = True
        marker = "o" if len(steps) <= 30 else None
        for i, p in enumerate(self.points):
            right.plot(steps, values[i], marker=marker, ms=3, lw=1,
                       label=label(p) if len(self.points) <= 12 else None)
        finite = values[np.isfinite(values)]
        if log and finite.size and finite.min() > 0:
            right.set_yscale("log")
        right.set_xlabel("step")
        right.set_ylabel(what)
        right.set_title(f"{what} of every run")
        right.grid(True, alpha=0.3)
        if len(self.points) <= 12:
            right.legend(fontsize="x-small")
        return save_figure(fig, path, dpi=110)


def sweep_mesh(devices=None) -> Mesh:
    """A one-axis mesh named `sweep` over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), ("sweep",))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def eval_ends(steps: int, eval_every: int) -> list[int]:
    """The steps after which a sweep evaluates: multiples of `eval_every`, and `steps`."""
    ends = list(range(eval_every, steps + 1, eval_every))
    return ends if ends and ends[-1] == steps else [*ends, steps]


def _held_out_rows(folds, runs) -> tuple[np.ndarray, np.ndarray]:
    """Each run's held-out rows padded to the largest fold, and their weights (0: pad)."""
    width = max(len(held) for _, held in folds)
    rows = np.zeros((len(runs), width), np.int32)
    weight = np.zeros((len(runs), width), np.float32)
    for i, p in enumerate(runs):
        held = folds[p["fold"]][1]
        rows[i, :len(held)], weight[i, :len(held)] = held, 1.0
    return rows, weight


def sweep(spec: RunSpec, grid: dict, train: dict, valid: dict, steps: int, devices=None,
          progress: bool = True, keep_params: bool = False, folds=None) -> SweepResult:
    """Train every point of `grid` for `steps` steps as one vmapped program.

    `folds`, a list of (train rows, held-out rows) of `train`: every point is trained once
    per fold on that fold's rows (in the order a run on `train[rows]` alone would draw
    them) and evaluated on its held-out rows; the result's points carry a `fold` key
    (point-major), its `evals` are the folds' held-out metrics and its `test` those of
    `valid` after the last step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise JaxtrainError(f"steps must be a positive integer, got {steps!r}")
    points = expand_grid(grid)
    if folds is not None:
        points = [{**p, "fold": f} for p in points for f in range(len(folds))]
    seeds = sorted({int(p.get("seed", 0)) for p in points})
    base = initial_state(spec, seeds[0])
    # one set of static fields (model adapter, transform) for all, so the states stack
    starts = {s: base.with_saved(initial_state(spec, s).saveable()) for s in seeds}
    swept = [n for n in grid if n != "seed"]
    unknown = set(swept) - injected_names(starts[seeds[0]].opt_state)
    if unknown:
        valid_names = sorted(injected_names(starts[seeds[0]].opt_state)) + ["seed"]
        raise JaxtrainError(f"cannot sweep {sorted(unknown)[0]!r}: not an injected "
                            f"hyperparameter of this optimizer (valid: {', '.join(valid_names)})")

    mesh = sweep_mesh(devices)
    ways = mesh.devices.size
    padded = points + [points[-1]] * (-len(points) % ways)  # fill every device
    along = NamedSharding(mesh, PartitionSpec("sweep"))
    everywhere = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(_stack([starts[int(p.get("seed", 0))] for p in padded]), along)
    hyper = jax.device_put({n: np.array([p[n] for p in padded], np.float32) for n in swept},
                           along)
    n_train = len(next(iter(train.values())))

    def rows(p: dict) -> np.ndarray:
        seed = int(p.get("seed", 0))
        if folds is None:
            return batch_indices(n_train, spec.batch_size, seed, steps)
        own = folds[p["fold"]][0]
        return own[batch_indices(len(own), spec.batch_size, seed, steps)]

    indices = np.stack([rows(p) for p in padded], axis=1)  # (steps, runs, batch)
    one_step_calls = conv_on_cpu(spec, base, train)
    train, valid = jax.device_put((train, valid), everywhere)

    start, chunk, evaluate = make_runner(spec)
    start = jax.jit(jax.vmap(start), out_shardings=along)
    chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 1, None), out_axes=(0, 1)),
                    donate_argnums=(0,), out_shardings=(along, NamedSharding(
                        mesh, PartitionSpec(None, "sweep"))))
    evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None)), out_shardings=along)
    held_out, eval_args = evaluate, (valid,)
    if folds is not None:
        held_out = jax.jit(jax.vmap(make_rows_evaluate(spec), in_axes=(0, None, 0, 0)),
                           out_shardings=along)
        eval_args = (train, *jax.device_put(_held_out_rows(folds, padded), along))
    state = start(state, hyper)
    indices = jax.device_put(indices, NamedSharding(mesh, PartitionSpec(None, "sweep")))
    ends = eval_ends(steps, spec.eval_every)
    calls = [(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    if one_step_calls:
        calls = [(i, i + 1) for i in range(steps)]

    t0 = time.perf_counter()
    compiled = {n: chunk.lower(state, indices[:n], train).compile()
                for n in {b - a for a, b in calls}}
    held_out = held_out.lower(state, *eval_args).compile()
    compile_seconds = time.perf_counter() - t0
    bar = Progress(steps, f"sweep ({len(points)} runs)", enabled=progress)
    losses, evals = [], []
    t0 = time.perf_counter()
    for a, b in calls:
        state, loss = compiled[b - a](state, indices[a:b], train)
        losses.append(loss)
        if b in ends:
            evals.append(held_out(state, *eval_args))
            bar.update(b, {})
    test = None if folds is None else evaluate(state, valid)
    losses, evals, test = jax.device_get((losses, evals, test))
    run_seconds = time.perf_counter() - t0
    bar.close()

    n = len(points)
    return SweepResult(
        points=points,
        train_loss=np.concatenate(losses, axis=0).T[:n],
        evals={k: np.stack([e[k] for e in evals], axis=1)[:n] for k in evals[0]},
        eval_steps=np.array(ends),
        monitor=spec.task.monitor,
        mode=spec.task.mode,
        compile_seconds=compile_seconds,
        run_seconds=run_seconds,
        params=jax.tree.map(lambda x: x[:n], state.params) if keep_params else None,
        test=None if test is None else {k: v[:n] for k, v in test.items()},
    )
