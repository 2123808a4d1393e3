"""A hyperparameter grid trained as one vmapped, jitted program.

Every grid point is a whole training run; their states are stacked on a leading axis and
advanced together (`jax.vmap`), one `eval_every`-step chunk per compiled call, sharded
over the devices along a `sweep` mesh axis. `seed` in the grid varies the init and the
data order; every other name sets an injected hyperparameter of the optimizer.
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
from ..train import Progress, plot_curves
from .runs import RunSpec, batch_indices, initial_state, injected_names, make_runner


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
        best = self.best_index()
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
        for i, r in enumerate(rows):
            mark = "  <- best" if i == best else ""
            lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + mark)
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        label = lambda p: ", ".join(f"{k}={v:.3g}" for k, v in p.items())
        curves = {label(p): list(zip(self.eval_steps.tolist(), self.evals["loss"][i].tolist(),
                                     strict=True))
                  for i, p in enumerate(self.points)}
        return plot_curves(curves, path, ylabel="held-out loss", title="sweep")


def sweep_mesh(devices=None) -> Mesh:
    """A one-axis mesh named `sweep` over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), ("sweep",))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def sweep(spec: RunSpec, grid: dict, train: dict, valid: dict, steps: int, devices=None,
          progress: bool = True, keep_params: bool = False) -> SweepResult:
    """Train every point of `grid` for `steps` steps as one vmapped program."""
    if steps <= 0 or steps % spec.eval_every:
        raise JaxtrainError(f"steps ({steps}) must be a positive multiple of eval_every "
                            f"({spec.eval_every})")
    points = expand_grid(grid)
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
    indices = np.stack([batch_indices(n_train, spec.batch_size, int(p.get("seed", 0)), steps)
                        for p in padded])
    train, valid = jax.device_put((train, valid), everywhere)

    start, step, evaluate = make_runner(spec)
    start = jax.jit(jax.vmap(start), out_shardings=along)
    step = jax.jit(jax.vmap(step, in_axes=(0, 0, None)), donate_argnums=(0,),
                   out_shardings=along)
    evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None)), out_shardings=along)
    state = start(state, hyper)
    indices = jax.device_put(np.ascontiguousarray(indices.transpose(1, 0, 2)),
                             NamedSharding(mesh, PartitionSpec(None, "sweep")))

    t0 = time.perf_counter()
    step = step.lower(state, indices[0], train).compile()
    evaluate = evaluate.lower(state, valid).compile()
    compile_seconds = time.perf_counter() - t0
    bar = Progress(steps, f"sweep ({len(points)} runs)", enabled=progress)
    losses, evals = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        state, loss = step(state, indices[i], train)
        losses.append(loss)
        if (i + 1) % spec.eval_every == 0:
            evals.append(evaluate(state, valid))
            bar.update(i + 1, {})
    losses, evals = jax.device_get((losses, evals))
    run_seconds = time.perf_counter() - t0
    bar.close()

    n = len(points)
    return SweepResult(
        points=points,
        train_loss=np.stack(losses, axis=1)[:n],
        evals={k: np.stack([e[k] for e in evals], axis=1)[:n] for k in evals[0]},
        eval_steps=np.arange(1, steps // spec.eval_every + 1) * spec.eval_every,
        monitor=spec.task.monitor,
        mode=spec.task.mode,
        compile_seconds=compile_seconds,
        run_seconds=run_seconds,
        params=jax.tree.map(lambda x: x[:n], state.params) if keep_params else None,
    )
