"""Scanned vs unrolled GPT train step: compile time and steps/s under fsdp on 8 CPU devices.

The same GPT (same seed, so the same numbers) is built unrolled with no remat (the step
before issue 24) and scanned (`scan_layers=True`) with each `--remats` policy; each
AdamW step is compiled under the `fsdp` preset on a `data=1, fsdp=8` mesh of simulated
CPU devices (params and optimizer state donated). Compile time: `lower` + `compile` of
each, once. Steps/s: the variants run `--steps` steps in turn, `--reps` rounds; the
median per-round ratio to the unrolled step is reported.

    python benchmarks/scan_layers.py [--d-model 256 --layers 8 --heads 8 --seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sharding_memory import build  # noqa: E402

from jaxtrain import sharding  # noqa: E402


def variant(args, mesh, scan_layers: bool, remat: str):
    """(compiled step, placed state, compile seconds) of one GPT layout."""
    state, axes, step = build(args, scan_layers, remat, shapes_only=False)
    shardings = sharding.state_shardings(state, mesh, "fsdp", axes)
    state = sharding.place(state, shardings)
    batch = sharding.shard_batch(np.zeros((args.batch, args.seq + 1), np.int32), mesh)
    start = time.perf_counter()
    compiled = sharding.compile_step(step, mesh, shardings).lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--remats", default="none,full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    mesh = sharding.make_mesh(data=1, fsdp=8)
    names = ["unrolled"] + [f"scanned {r}" for r in args.remats.split(",")]
    runs = {}
    for name in names:
        scanned = name != "unrolled"
        runs[name] = list(variant(args, mesh, scanned, name.split()[-1] if scanned else "none"))
    rates = {name: [] for name in names}
    for _ in range(args.reps + 1):  # the first round warms up and is dropped
        for name in names:
            compiled, state, batch, _ = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            runs[name][1] = state
            rates[name].append(args.steps / (time.perf_counter() - start))
    print(f"GPT d_model={args.d_model} layers={args.layers} heads={args.heads} batch "
          f"{args.batch}x{args.seq}; fsdp 8-way on 8 CPU devices; {args.reps} rounds of "
          f"{args.steps} steps")
    print(f"{'variant':<16} {'compile s':>9} {'steps/s':>8} {'ratio':>6}")
    for name in names:
        base = rates["unrolled"][1:]
        ratio = statistics.median(r / b for r, b in zip(rates[name][1:], base, strict=True))
        row = {"bench": "scan_layers", "variant": name, "compile_s": runs[name][3],
               "steps_per_s": statistics.median(rates[name][1:]), "ratio_to_unrolled": ratio,
               "round_steps_per_s": rates[name][1:]}
        print(json.dumps(row))
        print(f"{name:<16} {row['compile_s']:9.1f} {row['steps_per_s']:8.2f} {ratio:6.3f}")


if __name__ == "__main__":
    main()
