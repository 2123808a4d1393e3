"""The parameter server on Ray actors (`jaxtrain.strategies.param_server`) on the digits
CNN: held-out accuracy against gradient evaluations (examples whose gradients were
applied) and wall time, synchronous data parallel vs asynchronous with staleness bounds
1, 4 and 16, with the staleness the server observed.

A local Ray cluster, one server and `--workers` worker actors (one pool for every run);
each gradient is of `--batch` examples of the worker's own share; Adam 3e-3 on the server.
Sync takes `--steps` steps of W gradients each (global batch W x batch); async applies
W x steps single gradients: the same number of gradient evaluations. Held-out accuracy
(digits 0-9, 25% held out) every `--every` sync steps' worth of examples. Wall time: from
the server's start (workers and server already compiled) to its last apply. Prints one
JSON line per run and a table of the median over `--seeds` runs. `--straggler S`: worker
0 sleeps S seconds in each gradient (a slower machine), which sync steps wait for.

    python benchmarks/param_server.py [--workers 4] [--steps 150] [--seeds 3]
                                      [--straggler 0.1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import ray

from jaxtrain import transforms
from jaxtrain.data import digits_split
from jaxtrain.models.registry import build
from jaxtrain.strategies import ParamServerPool
from jaxtrain.train import TrainState, classification_loss, classification_metrics


def straggling_loss(model, batch, rng):
    """`classification_loss`, sleeping `batch["nap"][0]` seconds first (worker 0's share)."""
    jax.debug.callback(lambda nap: time.sleep(float(nap)), batch["nap"][0])
    return classification_loss(model, batch, rng)


def run(pool, mode: str, bound, seed: int, args, data) -> dict:
    train, valid = data
    workers = len(pool.workers)
    scale = 1 if mode == "sync" else workers  # async: one gradient per version
    state = TrainState.create(build("cnn", seed), transforms.adam(3e-3),
                              jax.random.PRNGKey(seed))
    loss = classification_loss
    if args.straggler:
        nap = (np.arange(len(train["label"])) % workers == 0) * args.straggler
        train, loss = {**train, "nap": nap.astype(np.float32)}, straggling_loss
    got = pool.train(state, loss, train, steps=args.steps * scale,
                     batch_size=args.batch, mode=mode, max_staleness=bound, seed=seed,
                     valid=valid, metric_fn=classification_metrics,
                     eval_every=args.every * scale, timeout=1800)
    return {"mode": mode, "bound": bound, "seed": seed, "workers": workers,
            "batch": args.batch, "straggler": args.straggler, "seconds": got.seconds,
            "applied": got.steps,
            "staleness": got.staleness_summary(),
            "curve": [(e["examples"], round(e["seconds"], 3), e["accuracy"])
                      for e in got.evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150, help="sync steps")
    parser.add_argument("--every", type=int, default=50, help="sync steps between evals")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bounds", default="1,4,16")
    parser.add_argument("--straggler", type=float, default=0.0,
                        help="seconds worker 0 sleeps per gradient")
    parser.add_argument("--num-cpus", type=int, default=None, help="ray.init(num_cpus=)")
    args = parser.parse_args()
    data = digits_split(tuple(range(10)), seed=0)
    configs = [("sync", None)] + [("async", int(b)) for b in args.bounds.split(",")]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1"}})
    rows = {c: [] for c in configs}
    with ParamServerPool(args.workers) as pool:
        for seed in range(args.seeds):  # configs interleaved: load drifts hit all alike
            for mode, bound in configs:
                row = run(pool, mode, bound, seed, args, data)
                print(json.dumps(row), flush=True)
                rows[(mode, bound)].append(row)
    ray.shutdown()
    examples = [x for x, _, _ in rows[configs[0]][0]["curve"]][1:]
    med = statistics.median
    head = " | ".join(f"acc @ {x} ex." for x in examples)
    print(f"\n| mode | bound | staleness mean / max | {head} | wall s | gradients/s |")
    print("|---|---:|---:|" + "---:|" * len(examples) + "---:|---:|")
    for (mode, bound), runs in rows.items():
        accs = [med([r["curve"][i + 1][2] for r in runs]) for i in range(len(examples))]
        stale_mean = med([r["staleness"]["mean"] for r in runs])
        stale_max = max(r["staleness"]["max"] for r in runs)
        grads = args.steps * args.workers
        seconds = med([r["seconds"] for r in runs])
        print(f"| {mode} | {bound if bound is not None else '-'} | {stale_mean:.2f} / "
              f"{stale_max} | " + " | ".join(f"{a:.3f}" for a in accs)
              + f" | {seconds:.1f} | {grads / seconds:.0f} |")


if __name__ == "__main__":
    main()
