"""jaxtrain against PyTorch on the same machine: (a) the optimizer step.

(a) One update of ~10M float32 params laid out as 1 leaf and as 200 leaves, for AdamW,
Adam, SGD (plain, one pass on both sides: the yardstick of equal bytes) and with momentum,
Adagrad, RMSprop and Muon: jaxtrain's transform (jitted, params and state donated, as the
Trainer runs it) against every implementation torch 2.13 has of the same algorithm:
`fused=True`, `foreach=True` (multi-tensor) and `foreach=False` (single-tensor). Before
anything is timed each torch variant takes one step from the same params and gradients as
jaxtrain and the results must agree (float32 rounding; Muon within 2% of the distance
moved, since torch runs Newton-Schulz in bfloat16). Then all sides of one optimizer and
layout run alternately, one step each per round (the order rotating, each step after
`--settle-ms` of idle time), and the median, min and max per side are reported, with
jaxtrain's speed relative to the fastest torch side.

    nice -n 0 python benchmarks/vs_torch.py [--runs 15] [--only adamw,muon] [--leaves 1,200]
    python benchmarks/vs_torch.py --passes   # loops and bytes per param of jaxtrain's steps

Prints versions and thread counts, one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from optimizer_step import make_step

from jaxtrain import transforms as T

N_PARAMS = 10_000_000
LR, WD = 1e-3, 1e-2


def _torch_variants(make):
    """{variant: factory(params) -> optimizer} for the variants torch accepts on this device."""
    return {v: (lambda ps, kw=kw: make(ps, **kw)) for v, kw in
            (("fused", {"fused": True}), ("foreach", {"foreach": True}),
             ("single", {"foreach": False}))}


# name -> (jaxtrain transform, torch variants, leaf width, agreement tolerance as a
# fraction of the distance moved). Leaves are (rows, width); Muon's are tall (rows, 8) so
# that Newton-Schulz is exercised without dominating, and torch sees them transposed
# ((out, in) weights), which gives both sides the same shape-dependent scale.
CASES = {
    "adamw": (T.adamw(LR, weight_decay=WD),
              _torch_variants(lambda ps, **kw: torch.optim.AdamW(ps, lr=LR, weight_decay=WD,
                                                                 **kw)), 1000, 1e-4),
    "adam": (T.adam(LR),
             _torch_variants(lambda ps, **kw: torch.optim.Adam(ps, lr=LR, **kw)), 1000, 1e-4),
    # plain SGD: one pass over p and g on both sides (12 bytes per param), so its ratio is
    # the two frameworks' streaming rates alone, the yardstick for the others' passes
    "sgd": (T.sgd(LR), _torch_variants(lambda ps, **kw: torch.optim.SGD(ps, lr=LR, **kw)),
            1000, 1e-5),
    "sgd_momentum": (T.sgd(LR, momentum=0.9),
                     _torch_variants(lambda ps, **kw: torch.optim.SGD(ps, lr=LR, momentum=0.9,
                                                                      **kw)), 1000, 1e-5),
    "adagrad": (T.adagrad(LR, 0.0, 1e-10, eps_in_sqrt=False),
                _torch_variants(lambda ps, **kw: torch.optim.Adagrad(
                    ps, lr=LR, initial_accumulator_value=0.0, eps=1e-10, **kw)), 1000, 1e-4),
    "rmsprop": (T.rmsprop(LR, decay=0.99, eps=1e-8, eps_in_sqrt=False),
                _torch_variants(lambda ps, **kw: torch.optim.RMSprop(ps, lr=LR, alpha=0.99,
                                                                     eps=1e-8, **kw)), 1000,
                1e-4),
    "muon": (T.muon(LR, beta=0.95, weight_decay=0.1, bias_correction=False, eps=1e-7),
             {"single": lambda ps: torch.optim.Muon(ps, lr=LR, momentum=0.95,
                                                    weight_decay=0.1)}, 8, 0.02),
}


def _problem(leaves: int, width: int, seed: int = 0):
    """Params and gradients as numpy: `leaves` (rows, width) float32 matrices."""
    rows = N_PARAMS // (width * leaves)
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal((rows, width), dtype=np.float32) for _ in range(leaves)]
    grads = [1e-3 * rng.standard_normal((rows, width), dtype=np.float32) for _ in range(leaves)]
    return params, grads


def _jax_side(tx, params, grads):
    tree = {f"p{i:03d}": jnp.asarray(p) for i, p in enumerate(params)}
    jgrads = {f"p{i:03d}": jnp.asarray(g) for i, g in enumerate(grads)}
    step = make_step(tx)
    carry = [(tree, tx.init(tree))]

    def run():
        carry[0] = step(carry[0], jgrads)
        jax.block_until_ready(carry[0])

    def current():
        return [np.asarray(carry[0][0][f"p{i:03d}"]) for i in range(len(params))]

    return run, current


def _torch_side(make, params, grads, transpose):
    flip = (lambda a: a.T.copy()) if transpose else (lambda a: a.copy())
    tparams = [torch.nn.Parameter(torch.from_numpy(flip(p))) for p in params]
    for p, g in zip(tparams, grads, strict=True):
        p.grad = torch.from_numpy(flip(g))
    opt = make(tparams)

    def run():
        opt.step()

    def current():
        return [flip(p.detach().numpy()) for p in tparams]

    return run, current


def _check_agree(name, sides, params, tol):
    """One step of every side from the same start; each must match jaxtrain's result to
    `tol` of the distance moved plus float32 rounding of the params (4 ulps)."""
    results = {}
    for side, (run, current) in sides.items():
        run()
        results[side] = current()
    ours = results["jaxtrain"]
    moved = max(float(np.max(np.abs(o - p))) for o, p in zip(ours, params, strict=True))
    ulps = 4 * np.finfo(np.float32).eps * max(float(np.max(np.abs(p))) for p in params)
    for side, res in results.items():
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(res, ours, strict=True))
        if not err <= tol * moved + ulps:
            raise SystemExit(f"{name} {side}: differs from jaxtrain by {err:.3g} after one step "
                             f"(moved {moved:.3g}, tolerance {tol * moved + ulps:.3g})")
    return moved


def optimizer_step(name, leaves, runs, settle, warmup=3):
    tx, variants, width, tol = CASES[name]
    params, grads = _problem(leaves, width)
    sides = {"jaxtrain": _jax_side(tx, params, grads)}
    for variant, make in variants.items():
        try:  # torch refuses here a variant it lacks for this optimizer or device
            _torch_side(make, params, grads, transpose=name == "muon")[0]()
        except (RuntimeError, ValueError, TypeError) as err:
            print(f"# {name} torch {variant}: not available ({str(err).splitlines()[0]})")
            continue
        sides[f"torch {variant}"] = _torch_side(make, params, grads, transpose=name == "muon")
    t0 = time.perf_counter()
    sides["jaxtrain"][0]()  # compile
    compile_s = time.perf_counter() - t0
    sides["jaxtrain"] = _jax_side(tx, params, grads)  # fresh state; the step is cached
    _check_agree(name, sides, params, tol)
    times, order = {side: [] for side in sides}, list(sides)
    for r in range(warmup + runs):
        order = order[1:] + order[:1]  # each side goes first in turn
        for side in order:
            time.sleep(settle)  # the previous side's threads (torch's OpenMP spin) go idle
            t0 = time.perf_counter()
            sides[side][0]()
            if r >= warmup:
                times[side].append(time.perf_counter() - t0)
    best_torch = min(statistics.median(ts) for s, ts in times.items() if s != "jaxtrain")
    ours = statistics.median(times["jaxtrain"])
    rows = []
    for side, ts in times.items():
        rows.append({"bench": "vs_torch_optimizer", "optimizer": name, "leaves": leaves,
                     "params": len(params) * params[0].size, "side": side, "runs": runs,
                     "median_ms": round(1e3 * statistics.median(ts), 3),
                     "min_ms": round(1e3 * min(ts), 3), "max_ms": round(1e3 * max(ts), 3)})
    rows.append({"bench": "vs_torch_optimizer", "optimizer": name, "leaves": leaves,
                 "side": "jaxtrain speed / fastest torch", "ratio": round(best_torch / ours, 3),
                 "jaxtrain_compile_s": round(compile_s, 2)})
    return rows


def memory_passes(name: str, leaves: int) -> dict:
    """What XLA:CPU compiled jaxtrain's step into, read off the optimized HLO: the loops
    that touch param-sized arrays, the bytes they read and write per param (each loop's
    array operands and outputs), and how many parts each loop is split into for the
    thread pool (`outer_dimension_partitions`). torch's fused kernels make one pass over
    the memory: AdamW 28 bytes per param (read p, g, m, v; write p, m, v)."""
    tx, _, width, _ = CASES[name]
    params, grads = _problem(leaves, width)
    tree = {f"p{i:03d}": jnp.asarray(p) for i, p in enumerate(params)}
    text = make_step(tx).lower((tree, tx.init(tree)), tree).compile().as_text()
    entry = text[text.index("\nENTRY"):].split("\n}\n")[0]
    size = {}  # name -> bytes of an array value of the entry computation
    shape_re = r"(f32|s32|bf16)\[([\d,]*)\]"
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = " + shape_re, line)
        if m:
            dims = [int(d) for d in m.group(3).split(",") if d]
            size[m.group(1)] = 4 * int(np.prod(dims)) if m.group(2) != "bf16" else 2 * int(
                np.prod(dims))
    big = min(p.size for p in params) * 4
    loops, moved, parts = 0, 0, set()
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ (fusion|dot|custom-call|copy)\((.*?)\)", line)
        if not m or size.get(m.group(1), 0) < big:
            continue
        loops += 1
        operands = re.findall(r"%([\w.\-]+)", m.group(3))
        moved += size[m.group(1)] + sum(size.get(o, 0) for o in operands
                                        if size.get(o, 0) >= big)
        parts.update(re.findall(r'"outer_dimension_partitions":\["(\d+)"\]', line))
    n = sum(p.size for p in params)
    return {"bench": "vs_torch_passes", "optimizer": name, "leaves": leaves,
            "param_sized_loops": loops, "loops_per_leaf": round(loops / leaves, 2),
            "bytes_per_param": round(moved / n, 1),
            "outer_dimension_partitions": sorted(parts)}


def environment() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "optax": optax.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "jax_devices": str(jax.devices()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--leaves", default="1,200")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--settle-ms", type=float, default=20.0,
                        help="idle time before each timed step: after a torch step its "
                             "OpenMP threads spin on the cores for a while, and a jaxtrain "
                             "step started at once ran ~1.3x slower (0 to see it)")
    parser.add_argument("--passes", action="store_true",
                        help="only read the loops and bytes per param off jaxtrain's "
                             "compiled steps (no timing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--only: unknown optimizer {unknown[0]!r} (valid: {', '.join(CASES)})")
    print(json.dumps({"bench": "vs_torch", **environment()}), flush=True)
    if args.passes:
        for leaves in (int(x) for x in args.leaves.split(",")):
            for name in names:
                print(json.dumps(memory_passes(name, leaves)), flush=True)
        return
    rows = []
    for leaves in (int(x) for x in args.leaves.split(",")):
        for name in names:
            for row in optimizer_step(name, leaves, args.runs, args.settle_ms / 1e3):
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n# load average at the end: {os.getloadavg()}")
    print(f"{'optimizer':13s} {'leaves':>6s} {'side':16s} {'median ms':>9s} {'min':>8s} "
          f"{'max':>8s}")
    for r in rows:
        if "ratio" in r:
            print(f"{r['optimizer']:13s} {r['leaves']:6d} jaxtrain / best torch: {r['ratio']:.2f}x"
                  f" (compile {r['jaxtrain_compile_s']} s)")
        else:
            print(f"{r['optimizer']:13s} {r['leaves']:6d} {r['side']:16s} {r['median_ms']:9.2f} "
                  f"{r['min_ms']:8.2f} {r['max_ms']:8.2f}")


if __name__ == "__main__":
    main()
