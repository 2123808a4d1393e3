"""`jaxtrain sweep`, `compare`, `lr-find` and `batch-size`: the tuning tools on a run config.

Each takes the YAML config of `jaxtrain train` (model, data, task, optimizer, train
settings) with `key=value` overrides, and writes its table as JSON and its plot as PNG
into `--out` (default: the config's `out` folder plus the command's name).
"""

from __future__ import annotations

import argparse
import json
import math
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


def seed_list(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]: comma-separated seeds, each an integer >= 0."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers >= 0 (e.g. 0,1,2), got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def finite_float(text: str) -> float:
    """A finite number (nan and inf would make every comparison with it false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_floats(text: str) -> list[float]:
    """`0.333,1,3` -> [0.333, 1.0, 3.0]: comma-separated numbers, each finite and > 0."""
    return [positive_float(t) for t in text.split(",")]


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a memory limit)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _config(args):
    """The checked config with its overrides; `--steps` sets `train.steps` unless an
    override sets it to another value (refused: which one wins would be a guess)."""
    from dataclasses import replace

    from .train.config import load_config

    cfg = load_config(args.config, args.overrides)
    steps = getattr(args, "steps", None)
    if steps is not None:
        given = [o for o in args.overrides if o.partition("=")[0].strip() == "train.steps"]
        if given and cfg.train.steps != steps:
            raise JaxtrainError(f"--steps {steps} conflicts with the override {given[-1]}: "
                                "give the number of steps once")
        cfg = replace(cfg, train=replace(cfg.train, steps=steps))
    return cfg


def _problem(args, one_device_runs: bool = True, **kwargs):
    from .tune.setup import check_one_device_runs, problem_from_config

    cfg = _config(args)
    if one_device_runs:
        check_one_device_runs(cfg, args.command)
    out = Path(args.out or Path(cfg.out) / args.command)
    problem = problem_from_config(cfg, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    return problem, cfg, out


def cmd_sweep(args) -> int:
    from .tune.sweep import sweep

    grid = parse_grid(args.grid or ["learning_rate=log:1e-4:1e-1:8"])
    problem, cfg, out = _problem(args)
    if args.folds is not None:
        return _cross_validate(args, grid, problem, cfg, out)
    result = sweep(problem.spec, grid, problem.train, problem.valid, cfg.train.steps,
                   progress=not args.quiet)
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


def parse_strategies(names: str, specs: list[str]) -> dict:
    """`--strategies a,b` (presets or optimizer names) and `--strategy LABEL=YAML` (any
    optimizer spec) -> {label: name or spec}."""
    import yaml

    from .yaml_numbers import load

    out: dict = {name: name for name in names.split(",") if name}
    for item in specs:
        label, sep, text = item.partition("=")
        if not sep or not label:
            raise JaxtrainError(f"--strategy {item!r}: write LABEL={{optimizer: NAME, ...}}")
        try:
            out[label] = load(text)
        except yaml.YAMLError:
            raise JaxtrainError(f"--strategy {label}: {text!r} is not valid YAML") from None
    return out


def cmd_compare(args) -> int:
    from .config import to_dict
    from .tune.compare import compare

    strategies = parse_strategies(args.strategies, args.strategy or [])
    seeds = args.seeds
    problem, cfg, out = _problem(args, max_eval_examples=args.eval_examples)
    # the runs a saved sweep must match besides its strategy: the config minus its optimizer
    key = {"config": {k: v for k, v in to_dict(cfg).items() if k != "optimizer"},
           "eval_examples": args.eval_examples}
    result = compare(problem.spec, strategies, problem.train, problem.valid,
                     cfg.train.steps, seeds=seeds, target=args.target,
                     progress=not args.quiet, folds=args.folds, fold_seed=cfg.seed,
                     lr_scales=args.lr_scales, cache=out / "sweeps" if args.resume else None,
                     problem_key=key)
    print(result.table())
    result.plot(out / "compare.png")
    rows = [{"strategy": r.name, "learning_rate": r.learning_rate,
             "final_mean": float(r.final.mean()), "final_std": float(r.final.std()),
             "final": r.final.tolist(), "best_mean": float(r.best.mean()),
             "steps_to_target": r.steps_to_target,
             "steps_per_seed": r.steps_per_seed.tolist(),
             "seconds_to_target": r.seconds_to_target} for r in result.results]
    (out / "compare.json").write_text(json.dumps({"target": result.target, "seeds": seeds,
                                                  "folds": args.folds, "results": rows},
                                                 indent=1) + "\n")
    print(f"wrote {out / 'compare.png'}, {out / 'compare.json'}")
    return 0


def cmd_lr_find(args) -> int:
    from .tune.lr_find import lr_find

    problem, cfg, out = _problem(args)
    result = lr_find(problem.spec, problem.train, steps=cfg.train.steps,
                     min_lr=args.min_lr, max_lr=args.max_lr, seed=cfg.seed,
                     progress=not args.quiet)
    result.plot(out / "lr_find.png")
    print(f"suggested learning rate: {result.suggestion:.3g} "
          f"(steepest descent of the smoothed loss over {len(result.losses)} steps)")
    print(f"wrote {out / 'lr_find.png'}")
    return 0


def cmd_batch_size(args) -> int:
    import jax

    from . import sharding
    from .config import to_dict
    from .train import make_train_step
    from .train.state import param_logical_axes
    from .tune.batch_size import find_batch_size
    from .tune.runs import initial_state

    problem, cfg, out = _problem(args, one_device_runs=False)
    spec, train = problem.spec, cfg.train
    state = initial_state(spec, cfg.seed)
    mesh = sharding.make_mesh(**to_dict(cfg.sharding.mesh))
    shardings = (sharding.state_shardings(state, mesh, cfg.sharding.preset,
                                          param_logical_axes(spec.model_fn(cfg.seed))),
                 sharding.batch_sharding(mesh))
    step = make_train_step(spec.task.loss_fn, precision=spec.precision,
                           microbatches=spec.microbatches)
    example = {k: v[:1] for k, v in problem.train.items()}
    batch_for = lambda n: {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype)
                           for k, v in example.items()}
    limit = int(args.limit_mb * 2**20) if args.limit_mb else None
    ways = sharding.batch_parallelism(mesh) * spec.microbatches
    result = find_batch_size(step, state, batch_for, limit_bytes=limit, multiple_of=ways,
                             shardings=shardings)
    print(result.table())
    print(result.summary())
    print(f"(precision {train.precision}, microbatches {spec.microbatches}, "
          f"{sharding.batch_parallelism(mesh)}-way data parallel)")
    return 0


def _cross_validate(args, grid, problem, cfg, out) -> int:
    """`jaxtrain sweep --folds K`: the grid on K folds of the training split (the config's
    held-out split is the test set), chosen by the mean held-out metric."""
    from .tune.crossval import cross_validate

    cv = cross_validate(problem.spec, grid, problem.train, problem.valid, cfg.train.steps,
                        args.folds, cfg.seed, progress=not args.quiet)
    print(cv.table())
    best = cv.points[cv.best_index()]
    result = cv.result
    print(f"best: {best} by mean held-out {result.monitor} over {args.folds} folds "
          f"(seed {cfg.seed}); {len(result.points)} runs in {result.run_seconds:.1f} s "
          f"(+{result.compile_seconds:.1f} s compile)")
    cv.plot(out / "sweep.png")
    (out / "sweep.json").write_text(json.dumps(
        {"monitor": result.monitor, "folds": args.folds, "fold_seed": cfg.seed,
         "best": best, "points": cv.rows()}, indent=1) + "\n")
    print(f"wrote {out / 'sweep.png'}, {out / 'sweep.json'}")
    return 0


def add_commands(sub, positive_int) -> None:
    """Register the tuning subcommands on the `jaxtrain` parser."""

    def common(parser, steps: bool = True):
        parser.add_argument("config", help="a run config (see configs/)")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="config overrides, e.g. train.steps=200")
        if steps:
            parser.add_argument("--steps", type=positive_int,
                                help="training steps per run (default: the config's "
                                     "train.steps)")
        parser.add_argument("--out", help="output folder (default: <config out>/<command>)")
        parser.add_argument("--quiet", action="store_true", help="no progress output")

    def folds(parser, what: str):
        parser.add_argument("--folds", type=positive_int, metavar="K",
                            help=f"K-fold cross-validation on the training split: {what}")

    p = sub.add_parser("sweep", help="train a hyperparameter grid as one vmapped program")
    common(p)
    p.add_argument("--grid", action="append", metavar="NAME=VALUES",
                   help="learning_rate=1e-3,3e-3 or learning_rate=log:1e-4:1e-1:8 or "
                        "seed=0,1 (repeatable; default: 8 log-spaced learning rates)")
    folds(p, "every point trained on K folds (stratified by label), chosen by the mean "
             "held-out metric; the config's held-out split is the test set")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="compare optimizers, each tuned over learning rates")
    common(p)
    p.add_argument("--strategies", default="sgd,momentum,adam,adamw",
                   help="comma-separated presets (sgd, momentum, nesterov, adagrad, rmsprop, "
                        "adam, adamw, lion, schedule_free) or any optimizer name of "
                        "jaxtrain.transforms")
    p.add_argument("--strategy", action="append", metavar="LABEL=SPEC",
                   help="any optimizer spec as YAML, e.g. 'nsgd={optimizer: {name: "
                        "normalized_sgd, momentum: 0.9}}' (repeatable)")
    p.add_argument("--seeds", type=seed_list, default=[0, 1],
                   help="comma-separated seeds (default 0,1)")
    p.add_argument("--target", type=finite_float,
                   help="held-out target of the monitored metric")
    p.add_argument("--lr-scales", type=positive_floats, metavar="S1,S2,...",
                   help="each strategy's learning rates: these multiples of its own rate "
                        "(its spec's learning_rate, else its optimizer's default), e.g. "
                        "0.333,1,3 (default: a fixed grid per family)")
    p.add_argument("--eval-examples", type=positive_int, default=1024,
                   help="held-out examples per evaluation (default 1024)")
    p.add_argument("--resume", action="store_true",
                   help="save each strategy's runs under <out>/sweeps as they finish and "
                        "reuse those made with the same config, spec, rates, seeds and steps")
    folds(p, "each learning rate and seed trained on K folds, tuned by the mean over "
             "seeds and folds, reported on the folds' held-out rows")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("lr-find", help="the learning-rate range test")
    common(p)
    p.add_argument("--min-lr", type=positive_float, default=1e-6)
    p.add_argument("--max-lr", type=positive_float, default=1.0)
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("batch-size", help="largest batch whose compiled step fits in memory")
    common(p, steps=False)
    p.add_argument("--limit-mb", type=positive_float,
                   help="memory limit (default: the device's)")
    p.set_defaults(func=cmd_batch_size)


__all__ = ["add_commands", "parse_grid", "parse_strategies"]
