"""`jaxtrain sweep`, `compare`, `lr-find` and `batch-size`: the tuning tools on a run config.

Each takes the YAML config of `jaxtrain train` (model, data, task, optimizer, train
settings) with `key=value` overrides, and writes its table as JSON and its plot as PNG
into `--out` (default: the config's `out` folder plus the command's name).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import JaxtrainError


def parse_grid(items: list[str]) -> dict:
    """`name=v1,v2,...` or `name=log:LO:HI:N` (N log-spaced values) -> {name: [values]}."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise JaxtrainError(f"--grid {item!r}: write name=v1,v2,... or name=log:LO:HI:N")
        try:
            if values.startswith("log:"):
                lo, hi, n = values[4:].split(":")
                grid[name] = [float(v) for v in np.geomspace(float(lo), float(hi), int(n))]
            else:
                grid[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise JaxtrainError(f"--grid {item!r}: values must be numbers "
                                "(name=v1,v2,... or name=log:LO:HI:N)") from None
        if name == "seed":
            grid[name] = [int(v) for v in grid[name]]
    return grid


def _problem(args, optimizer=None):
    from .train.config import load_config
    from .tune.setup import problem_from_config

    cfg = load_config(args.config, args.overrides)
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
    out = Path(args.out or Path(cfg["out"]) / args.command)
    out.mkdir(parents=True, exist_ok=True)
    return problem_from_config(cfg, optimizer), cfg, out


def _steps(cfg, spec) -> int:
    steps = cfg["train"]["steps"]
    return max(spec.eval_every, steps - steps % spec.eval_every)


def cmd_sweep(args) -> int:
    from .tune.sweep import sweep

    grid = parse_grid(args.grid or ["learning_rate=log:1e-4:1e-1:8"])
    problem, cfg, out = _problem(args)
    result = sweep(problem.spec, grid, problem.train, problem.valid,
                   _steps(cfg, problem.spec), progress=not args.quiet)
    print(result.table())
    best = result.points[result.best_index()]
    print(f"best: {best}; {len(result.points)} runs in {result.run_seconds:.1f} s "
          f"(+{result.compile_seconds:.1f} s compile)")
    result.plot(out / "sweep.png")
    rows = [{**p, "final": float(f), "best": float(b)}
            for p, f, b in zip(result.points, result.final(), result.best(), strict=True)]
    (out / "sweep.json").write_text(json.dumps({"monitor": result.monitor, "best": best,
                                                "points": rows}, indent=1) + "\n")
    print(f"wrote {out / 'sweep.png'}, {out / 'sweep.json'}")
    return 0


def cmd_compare(args) -> int:
    from .tune.compare import compare

    strategies = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",")]
    problem, cfg, out = _problem(args)
    result = compare(problem.spec, strategies, problem.train, problem.valid,
                     _steps(cfg, problem.spec), seeds=seeds, target=args.target,
                     progress=not args.quiet)
    print(result.table())
    result.plot(out / "compare.png")
    rows = [{"strategy": r.name, "learning_rate": r.learning_rate,
             "final_mean": float(r.final.mean()), "final_std": float(r.final.std()),
             "best_mean": float(r.best.mean()), "steps_to_target": r.steps_to_target,
             "seconds_to_target": r.seconds_to_target} for r in result.results]
    (out / "compare.json").write_text(json.dumps({"target": result.target, "seeds": seeds,
                                                  "results": rows}, indent=1) + "\n")
    print(f"wrote {out / 'compare.png'}, {out / 'compare.json'}")
    return 0


def cmd_lr_find(args) -> int:
    from .tune.lr_find import lr_find

    problem, cfg, out = _problem(args)
    result = lr_find(problem.spec, problem.train, steps=args.steps or 100,
                     min_lr=args.min_lr, max_lr=args.max_lr, seed=cfg["seed"],
                     progress=not args.quiet)
    result.plot(out / "lr_find.png")
    print(f"suggested learning rate: {result.suggestion:.3g} "
          f"(steepest descent of the smoothed loss over {len(result.losses)} steps)")
    print(f"wrote {out / 'lr_find.png'}")
    return 0


def cmd_batch_size(args) -> int:
    import jax

    from .train import make_train_step
    from .tune.batch_size import find_batch_size
    from .tune.runs import initial_state

    problem, cfg, out = _problem(args)
    state = initial_state(problem.spec, cfg["seed"])
    step = make_train_step(problem.spec.task.loss_fn)
    example = {k: v[:1] for k, v in problem.train.items()}
    batch_for = lambda n: {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype)
                           for k, v in example.items()}
    limit = int(args.limit_mb * 2**20) if args.limit_mb else None
    result = find_batch_size(step, state, batch_for, limit_bytes=limit)
    print(result.table())
    print(f"largest batch that fits: {result.batch_size} "
          f"({result.peak_bytes / 2**20:.1f} MiB of {result.limit_bytes / 2**20:.0f} MiB); "
          "keep a larger effective batch with optimizer accumulate: k")
    return 0


def add_commands(sub, positive_int) -> None:
    """Register the tuning subcommands on the `jaxtrain` parser."""

    def common(parser):
        parser.add_argument("config", help="a run config (see configs/)")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="config overrides, e.g. train.steps=200")
        parser.add_argument("--steps", type=positive_int, help="training steps per run")
        parser.add_argument("--out", help="output folder (default: <config out>/<command>)")
        parser.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("sweep", help="train a hyperparameter grid as one vmapped program")
    common(p)
    p.add_argument("--grid", action="append", metavar="NAME=VALUES",
                   help="learning_rate=1e-3,3e-3 or learning_rate=log:1e-4:1e-1:8 or "
                        "seed=0,1 (repeatable; default: 8 log-spaced learning rates)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="compare optimizers, each tuned over learning rates")
    common(p)
    p.add_argument("--strategies", default="sgd,momentum,adam,adamw",
                   help="comma-separated: sgd, momentum, nesterov, adagrad, rmsprop, adam, "
                        "adamw, lion, schedule_free")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--target", type=float, help="held-out target of the monitored metric")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("lr-find", help="the learning-rate range test")
    common(p)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("batch-size", help="largest batch whose compiled step fits in memory")
    common(p)
    p.add_argument("--limit-mb", type=float, help="memory limit (default: the device's)")
    p.set_defaults(func=cmd_batch_size)


__all__ = ["add_commands", "parse_grid"]
