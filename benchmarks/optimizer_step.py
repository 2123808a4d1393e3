"""One jitted, donated update+apply of each jaxtrain optimizer against its Optax twin.

Both sides run in one process, alternating, on a 1-leaf and a 200-leaf pytree of 10M
float32 params (tall (n, 8) matrices, so that Muon's Newton-Schulz and Adafactor's
factoring are exercised without dominating); the median of `--runs` timings after
warm-up is reported per side, with the ratio ours / Optax. Then AdamW's achieved
bandwidth (4 reads + 3 writes of 4 bytes per param) against a donated elementwise
copy (1 read + 1 write) of the same bytes.

    python benchmarks/optimizer_step.py [--runs 10] [--only adam,adamw] [--inner K]
    python benchmarks/optimizer_step.py --compile [--leaves 1000] [--runs 7] [--only ...]

`--inner K` runs K updates per timed call (a `fori_loop` in the jitted function), so that
on a GPU, where one 10M-param update takes tens of microseconds, the timing measures the
device and not host dispatch.

`--compile` measures instead the time to trace, lower and compile that jitted step on a
pytree of `--leaves` small (64, 8) leaves (issue 20, point 5: a 1,000-leaf update must
compile in at most 1.2x Optax's time): each run a fresh `jax.jit` after
`jax.clear_caches()`, ours and Optax alternating, medians and the median ratio, of the
wall time and of the process's CPU time (`COMPILE_PAIRS`: the optimizers with an Optax
twin of the same algorithm).

Prints one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxtrain import transforms as T

N_PARAMS = 10_000_000
LR = 1e-3

# name -> (ours, Optax's twin). Where ours computes torch's formula the twin is Optax's
# formula for the same algorithm; `normalized_sgd` has no twin and is set against sgd.
PAIRS = {
    "control_optax_adam": (optax.adam(LR), optax.adam(LR)),  # A/A: the noise floor
    "sgd_momentum": (T.sgd(LR, momentum=0.9), optax.sgd(LR, momentum=0.9)),
    "ema_momentum": (T.ema_momentum(LR), optax.sgd(LR, momentum=0.9)),
    "adagrad": (T.adagrad(LR), optax.adagrad(LR)),
    "adagrad_torch": (T.adagrad(LR, 0.0, 1e-10, eps_in_sqrt=False), optax.adagrad(LR, 0.0, 1e-10)),
    "adadelta": (T.adadelta(1.0), optax.adadelta(1.0)),
    "rmsprop": (
        T.rmsprop(LR, centered=True, momentum=0.9),
        optax.rmsprop(LR, centered=True, momentum=0.9),
    ),
    "adam": (T.adam(LR), optax.adam(LR)),
    "adamw": (T.adamw(LR), optax.adamw(LR, weight_decay=1e-2)),
    "adamax": (T.adamax(LR), optax.adamax(LR)),
    "amsgrad": (T.amsgrad(LR), optax.amsgrad(LR)),
    "amsgrad_torch": (T.amsgrad(LR, max_of="raw"), optax.amsgrad(LR)),
    "nadam": (T.nadam(LR), optax.nadam(LR)),
    "nadam_torch": (T.nadam(LR, momentum_decay=4e-3), optax.nadam(LR)),
    "nadamw": (T.nadamw(LR), optax.nadamw(LR, weight_decay=1e-2)),
    "radam": (T.radam(LR), optax.radam(LR)),
    "normalized_sgd": (T.normalized_sgd(0.01, 0.01, LR), optax.sgd(LR)),
    "lion": (T.lion(LR), optax.lion(LR)),
    "lamb": (T.lamb(LR), optax.lamb(LR)),
    "lars": (T.lars(LR), optax.lars(LR)),
    "adafactor": (
        T.adafactor(LR, min_dim_size_to_factor=8),
        optax.adafactor(LR, min_dim_size_to_factor=8),
    ),
    "muon": (T.muon(LR), optax.contrib.muon(LR)),
    "schedule_free_adamw": (T.schedule_free_adamw(LR), optax.contrib.schedule_free_adamw(LR)),
}


# The compile-time comparison: the classics most used and the frontier ones with a twin.
COMPILE_PAIRS = {
    "adam": (T.adam(LR), optax.adam(LR)),
    "adamw": (T.adamw(LR), optax.adamw(LR, weight_decay=1e-2)),
    "sgd_momentum": (T.sgd(LR, momentum=0.9), optax.sgd(LR, momentum=0.9)),
    "lion": (T.lion(LR), optax.lion(LR)),
    "ademamix": (T.ademamix(LR), optax.contrib.ademamix(LR)),
    "muon": (T.muon(LR, adam_paths=()), optax.contrib.muon(LR)),
}


def make_tree(leaves: int) -> dict:
    rows = N_PARAMS // (8 * leaves)
    keys = jax.random.split(jax.random.key(0), leaves)
    return {f"p{i:03d}": jax.random.normal(k, (rows, 8)) for i, k in enumerate(keys)}


def repeated(update, inner=1):
    """`update(carry, grads) -> carry` run `inner` times in one jitted call (a `fori_loop`),
    the carry donated."""
    def many(carry, grads):
        if inner == 1:
            return update(carry, grads)
        return jax.lax.fori_loop(0, inner, lambda _, c: update(c, grads), carry)

    return jax.jit(many, donate_argnums=(0,))


def make_step(tx, inner=1):
    """`((params, state), grads) -> (params, state)`: `inner` updates of `tx`, donated."""
    def update(carry, grads):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return repeated(update, inner)


def _time(fn, carry, grads):
    start = time.perf_counter()
    carry = fn(carry, grads)
    jax.block_until_ready(carry)
    return time.perf_counter() - start, carry


def compare(name, ours, theirs, leaves, runs, inner=1, warmup=2):
    """Median seconds per call of each side, alternating, and the median of per-round ratios."""
    grads = jax.tree.map(lambda p: p * 1e-3, make_tree(leaves))
    sides = []
    for tx in (ours, theirs):
        params = make_tree(leaves)
        # Copied: Optax's schedule-free state aliases the params, which donation refuses.
        sides.append([make_step(tx, inner), (params, jax.tree.map(jnp.copy, tx.init(params)))])
    for _ in range(warmup):
        for side in sides:
            _, side[1] = _time(side[0], side[1], grads)
    times = ([], [])
    for _ in range(runs):
        for i, side in enumerate(sides):
            dt, side[1] = _time(side[0], side[1], grads)
            times[i].append(dt)
    ratios = [a / b for a, b in zip(*times, strict=True)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def compile_seconds(tx, leaves: int) -> tuple[float, float, float]:
    """Seconds to trace + lower, and to compile, a fresh jitted donated step of `tx` on
    `leaves` (64, 8) float32 leaves (shapes only: nothing runs), and the CPU seconds of
    this process for both (all its threads; less moved by other processes' load)."""
    params = {f"p{i:04d}": jax.ShapeDtypeStruct((64, 8), jnp.float32) for i in range(leaves)}
    carry = (params, jax.eval_shape(tx.init, params))
    jax.clear_caches()
    start, cpu = time.perf_counter(), time.process_time()
    lowered = make_step(tx).lower(carry, params)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced, time.process_time() - cpu


def compare_compile(ours, theirs, leaves, runs, warmup=1):
    """Median seconds (trace + lower, compile, total, CPU) of each side, alternating, and
    the medians of per-round ratios of the totals and of the CPU seconds."""
    times = ([], [])
    for r in range(warmup + runs):
        for i, tx in enumerate((ours, theirs)):
            trace, comp, cpu = compile_seconds(tx, leaves)
            if r >= warmup:
                times[i].append((trace, comp, trace + comp, cpu))
    med = [[statistics.median(t[k] for t in side) for k in range(4)] for side in times]
    ratios = [statistics.median(a[k] / b[k] for a, b in zip(*times, strict=True))
              for k in (2, 3)]
    return med[0], med[1], *ratios


def main_compile(args, names) -> None:
    import os

    print(json.dumps({"bench": "optimizer_compile", "jax": jax.__version__,
                      "optax": optax.__version__, "backend": jax.default_backend(),
                      "load_average": os.getloadavg()}), flush=True)
    rows = []
    for name in names:
        ours, theirs = COMPILE_PAIRS[name]
        mine, optax_s, ratio, cpu_ratio = compare_compile(ours, theirs, args.leaves, args.runs)
        rec = {"bench": "optimizer_compile", "optimizer": name, "leaves": args.leaves,
               "runs": args.runs, "ours_trace_s": round(mine[0], 3),
               "ours_compile_s": round(mine[1], 3), "ours_s": round(mine[2], 3),
               "optax_trace_s": round(optax_s[0], 3), "optax_compile_s": round(optax_s[1], 3),
               "optax_s": round(optax_s[2], 3), "ratio": round(ratio, 3),
               "ours_cpu_s": round(mine[3], 3), "optax_cpu_s": round(optax_s[3], 3),
               "cpu_ratio": round(cpu_ratio, 3),
               "load_average": os.getloadavg()[0]}
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    print(f"\n{'optimizer':14s} {'ours s (trace + compile)':>26s} "
          f"{'optax s (trace + compile)':>26s} {'ratio':>6s} {'cpu ratio':>9s}")
    for r in rows:
        print(f"{r['optimizer']:14s} {r['ours_s']:8.2f} ({r['ours_trace_s']:.2f} + "
              f"{r['ours_compile_s']:.2f}) {r['optax_s']:9.2f} ({r['optax_trace_s']:.2f} + "
              f"{r['optax_compile_s']:.2f}) {r['ratio']:6.3f} {r['cpu_ratio']:9.3f}")


def bandwidth(runs, leaves=1, warmup=2):
    """AdamW's bytes per second (28 per param) and a donated x+1 copy's (8 per param)."""
    tx = T.adamw(LR)
    params = make_tree(leaves)
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    adamw = [make_step(tx), (params, tx.init(params))]
    copy = [repeated(lambda x, _: jax.tree.map(lambda a: a + 1.0, x)), make_tree(leaves)]
    times = ([], [])
    for r in range(warmup + runs):
        for i, side in enumerate((adamw, copy)):
            dt, side[1] = _time(side[0], side[1], grads)
            if r >= warmup:
                times[i].append(dt)
    adamw_bw = 28 * N_PARAMS / statistics.median(times[0])
    copy_bw = 8 * N_PARAMS / statistics.median(times[1])
    return adamw_bw, copy_bw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument("--inner", type=int, default=1, help="updates per timed call")
    parser.add_argument("--compile", action="store_true", help="time compiling, not running")
    parser.add_argument("--leaves", type=int, default=1000, help="leaves, with --compile")
    args = parser.parse_args()
    pairs = COMPILE_PAIRS if args.compile else PAIRS
    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted if n not in pairs]
    if unknown:
        parser.error(f"--only: unknown optimizer {unknown[0]!r} (valid: {', '.join(pairs)})")
    names = [n for n in pairs if not wanted or n in wanted]
    if args.compile:
        main_compile(args, names)
        return
    rows = []
    for leaves in (1, 200):
        for name in names:
            ours, theirs = PAIRS[name]
            t_ours, t_optax, ratio = compare(name, ours, theirs, leaves, args.runs, args.inner)
            t_ours, t_optax = t_ours / args.inner, t_optax / args.inner
            rec = {
                "bench": "optimizer_step",
                "optimizer": name,
                "leaves": leaves,
                "params": N_PARAMS,
                "runs": args.runs,
                "inner": args.inner,
                "ours_ms": round(t_ours * 1e3, 3),
                "optax_ms": round(t_optax * 1e3, 3),
                "ratio": round(ratio, 4),
                "backend": jax.default_backend(),
            }
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    adamw_bw, copy_bw = bandwidth(args.runs)
    rec = {
        "bench": "adamw_bandwidth",
        "params": N_PARAMS,
        "adamw_GBps": round(adamw_bw / 1e9, 2),
        "copy_GBps": round(copy_bw / 1e9, 2),
        "fraction": round(adamw_bw / copy_bw, 3),
        "backend": jax.default_backend(),
    }
    print(json.dumps(rec), flush=True)

    print(f"\n{'optimizer':22s} {'leaves':>6s} {'ours ms':>9s} {'optax ms':>9s} {'ratio':>7s}")
    for r in rows:
        print(
            f"{r['optimizer']:22s} {r['leaves']:6d} {r['ours_ms']:9.2f} {r['optax_ms']:9.2f} "
            f"{r['ratio']:7.3f}"
        )
    print(
        f"\nAdamW {rec['adamw_GBps']} GB/s vs donated copy {rec['copy_GBps']} GB/s "
        f"({100 * rec['fraction']:.0f}%)"
    )


if __name__ == "__main__":
    main()
