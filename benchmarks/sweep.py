"""A 16-point learning-rate sweep of the digits CNN (or MLP): one vmapped program vs 16 runs of
the normal loop (`Trainer.fit`), one after another, same steps, same process.

Prints one JSON line per measurement and a table: wall time of each side (compile
included: users pay it), the median speed-up over alternating repeats, and the largest
difference between the sweep's final params and the sequential runs'.

    python benchmarks/sweep.py [--model cnn|mlp] [--steps 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jaxtrain import sharding, transforms
from jaxtrain.data import digits_split
from jaxtrain.models.registry import build
from jaxtrain.train import LoggingConfig, TrainConfig, Trainer, TrainerConfig
from jaxtrain.train.tasks import get_task
from jaxtrain.tune import RunSpec, sweep
from jaxtrain.tune.runs import initial_state


def sequential(spec, rates, train, valid, steps, device):
    """The 16 runs the ordinary way; returns their final params."""
    mesh = sharding.make_mesh(devices=[device])
    finals = []
    for lr in rates:
        state = initial_state(spec, 0)
        state = state.replace(opt_state=transforms.set_hyperparams(state.opt_state,
                                                                   learning_rate=lr))
        config = TrainerConfig(
            train=TrainConfig(batch_size=spec.batch_size, log_every=50), seed=0,
            logging=LoggingConfig(progress=False, plots=False, tensorboard=False),
            handle_signals=False)
        trainer = Trainer(state, spec.task.loss_fn, config, metric_fn=spec.task.metric_fn,
                          mesh=mesh)
        finals.append(trainer.fit(train, steps, eval_data=valid,
                                  eval_every=spec.eval_every).params)
    return jax.device_get(finals)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    args = parser.parse_args()
    train, valid = digits_split(range(10))
    model_fn = {"cnn": lambda s: build("cnn", s, num_classes=10),
                "mlp": lambda s: build("mlp", s, in_features=(8, 8), out_features=10)}
    spec = RunSpec(model_fn[args.model], get_task("classification"), transforms.adam(1e-3),
                   64, 50)
    rates = [float(r) for r in np.geomspace(1e-4, 3e-2, args.points)]
    device = jax.devices()[0]
    ratios, times = [], {"sweep": [], "sequential": []}
    diff = None
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        result = sweep(spec, {"learning_rate": rates}, train, valid, args.steps,
                       devices=[device], progress=False, keep_params=True)
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        finals = sequential(spec, rates, train, valid, args.steps, device)
        t_seq = time.perf_counter() - t0
        times["sweep"].append(t_sweep)
        times["sequential"].append(t_seq)
        ratios.append(t_seq / t_sweep)
        swept = jax.device_get(result.params)
        diffs = [max(float(np.max(np.abs(np.asarray(a)[i] - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(swept), jax.tree.leaves(f), strict=True))
                 for i, f in enumerate(finals)]
        diff = max(diffs)
        print(json.dumps({"bench": "sweep", "repeat": repeat, "points": args.points,
                          "steps": args.steps, "sweep_s": round(t_sweep, 2),
                          "sweep_compile_s": round(result.compile_seconds, 2),
                          "sequential_s": round(t_seq, 2), "speedup": round(ratios[-1], 2),
                          "max_param_diff": diff,
                          "param_diff_per_point": [float(f"{d:.1e}") for d in diffs],
                          "device": device.device_kind}), flush=True)
    print(f"\n{args.points}-point lr sweep, digits {args.model}, {args.steps} steps, batch 64, "
          f"1 {device.platform} device")
    print(f"  vmapped sweep   median {statistics.median(times['sweep']):7.1f} s")
    print(f"  {args.points} x Trainer    median {statistics.median(times['sequential']):7.1f} s")
    print(f"  speed-up        median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"  final params equal to the sequential runs': {sum(d < 1e-4 for d in diffs)} of "
          f"{len(diffs)} points within 1e-4 (largest difference {diff:.1e}, lr "
          f"{rates[int(np.argmax(diffs))]:.3g})")


if __name__ == "__main__":
    main()
