"""What a start of `jaxtrain train configs/char_gpt.yaml` spends compiling, without and with
the persistent compilation cache (`train.compilation_cache`).

Three starts, each a fresh process running the config for `--steps` steps (evaluation and
the generated sample at the end included, as a user's run has them): without a cache, with
an empty cache folder (the first start: compiles and writes), and again with the same folder
(the second start: loads). Each reports its wall time, the seconds XLA spent compiling
(JAX's `/jax/core/compile/backend_compile_duration` events, all programs), the seconds spent
reading the cache, the longest single compile (the train step), and the cache's hits and
misses.

    nice -n 0 python benchmarks/compile_time.py [--config configs/char_gpt.yaml] [--steps 2]

Prints one JSON line per start, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_start(config: str, steps: int, cache: str | None, out: str) -> dict:
    """Run the config in this process; what it spent compiling and loading."""
    t0 = time.perf_counter()
    import jax

    from jaxtrain.train.config import load_config
    from jaxtrain.train.run import run_config

    seconds = {"compile": [], "load": []}
    events = []

    def on_duration(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seconds["compile"].append(duration)
        elif event == "/jax/compilation_cache/cache_retrieval_time_sec":
            seconds["load"].append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
    overrides = [f"out={out}", f"train.steps={steps}", "train.eval_every=null",
                 "logging.plots=false", "logging.progress=false"]
    if cache is not None:
        overrides.append(f"train.compilation_cache={cache}")
    run_config(load_config(ROOT / config, overrides))
    return {"wall_s": round(time.perf_counter() - t0, 2),
            "compile_s": round(sum(seconds["compile"]), 2),
            "longest_compile_s": round(max(seconds["compile"], default=0.0), 2),
            "cache_load_s": round(sum(seconds["load"]), 2),
            "programs_compiled": len(seconds["compile"]),
            "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
            "cache_misses": events.count("/jax/compilation_cache/cache_misses")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/char_gpt.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child-cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_out is not None:
        cache = None if args.child_cache == "none" else args.child_cache
        print(json.dumps(one_start(args.config, args.steps, cache, args.child_out)))
        return
    import jax
    import jaxlib

    print(json.dumps({"bench": "compile_time", "config": args.config, "jax": jax.__version__,
                      "jaxlib": jaxlib.__version__, "cpus": os.cpu_count(),
                      "load_average": os.getloadavg()}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        for i, (name, folder) in enumerate((("no cache", "none"), ("first start", cache),
                                            ("second start", cache))):
            cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                   "--child-cache", folder, "--child-out", str(Path(tmp) / f"run{i}")]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{name}: failed\n{done.stderr[-3000:]}")
            rec = {"bench": "compile_time", "start": name,
                   **json.loads(done.stdout.strip().splitlines()[-1]),
                   "load_average": os.getloadavg()[0]}
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print(f"\n{'start':14s} {'wall s':>7s} {'compile s':>9s} {'longest':>8s} {'load s':>7s} "
          f"{'hits':>5s} {'misses':>6s}")
    for r in rows:
        print(f"{r['start']:14s} {r['wall_s']:7.2f} {r['compile_s']:9.2f} "
              f"{r['longest_compile_s']:8.2f} {r['cache_load_s']:7.2f} {r['cache_hits']:5d} "
              f"{r['cache_misses']:6d}")


if __name__ == "__main__":
    main()
