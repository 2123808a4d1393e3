"""AdamW at scale against the memory roofline: ours vs Optax vs torch's fused AdamW.

One process, one device, alternating rounds. Each side updates `--params` float32 params
laid out as 1 leaf and as 200 leaves, donated in place, and its achieved bandwidth counts
AdamW's fewest bytes (read params, grads, mu, nu; write params, mu, nu: 28 per param)
over the median step time. The roofline is the fastest device-to-device copy of the same
bytes: x + 1 donated in JAX, in-place x + 1 and `copy_` in torch (8 bytes per param).
`--inner K` runs K updates per call (a `fori_loop` inside the jitted function; K queued
steps in torch), so that host dispatch of many leaves is amortised and device time is
what is measured. Meant for a GPU (`--params 1e9`); on a CPU use a smaller `--params`.

    python benchmarks/adamw_bandwidth.py --params 1e9 --leaves 1,200 --runs 20 --inner 1

Prints one JSON line per side and layout, then a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from optimizer_step import make_step, repeated  # noqa: E402

from jaxtrain import transforms as T  # noqa: E402

LR, WD = 1e-3, 1e-2
ROW = 1000  # leaves are (n // ROW, ROW) matrices


def jax_tree(n_params: int, leaves: int, seed: int) -> dict:
    rows = n_params // (ROW * leaves)
    keys = jax.random.split(jax.random.key(seed), leaves)
    return {f"p{i:03d}": jax.random.normal(k, (rows, ROW)) for i, k in enumerate(keys)}


def jax_adamw_side(tx, n_params, leaves, inner):
    """Donated jitted update+apply; returns (run `inner` steps, bytes moved per step)."""
    params = jax_tree(n_params, leaves, 0)
    grads = jax.tree.map(lambda p: p * 1e-3, jax_tree(n_params, leaves, 1))
    carry = [(params, tx.init(params))]
    step = make_step(tx, inner)

    def run():
        carry[0] = step(carry[0], grads)
        jax.block_until_ready(carry)

    return run, 28 * n_params


def jax_copy_side(n_params, leaves, inner):
    carry = [jax_tree(n_params, leaves, 2)]
    add_one = repeated(lambda x, _: jax.tree.map(lambda a: a + 1.0, x), inner)

    def run():
        carry[0] = add_one(carry[0], None)
        jax.block_until_ready(carry)

    return run, 8 * n_params


def torch_sides(n_params, leaves, inner):
    """torch.optim.AdamW(fused=True) and an in-place torch copy, on the same device as JAX."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (n_params // (ROW * leaves), ROW)
    params = [torch.randn(shape, device=device, generator=gen).requires_grad_()
              for _ in range(leaves)]
    for p in params:
        p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    copies = [torch.randn(shape, device=device, generator=gen) for _ in range(leaves)]
    targets = [torch.empty_like(c) for c in copies]

    def run_adamw():
        for _ in range(inner):
            opt.step()
        sync()

    @torch.no_grad()
    def run_add():
        for _ in range(inner):
            torch._foreach_add_(copies, 1.0)
        sync()

    @torch.no_grad()
    def run_copy():
        for _ in range(inner):
            torch._foreach_copy_(targets, copies)
        sync()

    return {"torch fused AdamW": (run_adamw, 28 * n_params),
            "torch x + 1": (run_add, 8 * n_params),
            "torch copy_": (run_copy, 8 * n_params)}, torch.__version__


def measure(sides, runs, inner, warmup=3):
    """Median seconds per step of each side, alternating sides within every round."""
    times = {name: [] for name in sides}
    for r in range(warmup + runs):
        for name, (run, _) in sides.items():
            t0 = time.perf_counter()
            run()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e8)
    parser.add_argument("--leaves", default="1,200")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--inner", type=int, default=1, help="steps per timed call")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    layouts = [int(x) for x in args.leaves.split(",")]
    n_params = int(args.params) // (ROW * max(layouts)) * ROW * max(layouts)
    device = jax.devices()[0]
    versions = {"jax": jax.__version__, "optax": optax.__version__}
    rows = []
    for leaves in layouts:
        sides = {
            "jax x + 1": jax_copy_side(n_params, leaves, args.inner),
            "jaxtrain adamw": jax_adamw_side(T.adamw(LR, weight_decay=WD), n_params, leaves,
                                             args.inner),
            "optax adamw": jax_adamw_side(optax.adamw(LR, weight_decay=WD), n_params, leaves,
                                          args.inner),
        }
        if not args.no_torch:
            try:
                extra, versions["torch"] = torch_sides(n_params, leaves, args.inner)
                sides.update(extra)
            except ImportError:
                pass
        medians = measure(sides, args.runs, args.inner)
        bandwidths = {name: sides[name][1] / s for name, s in medians.items()}
        copy_bw = max(bw for name, bw in bandwidths.items() if "adamw" not in name.lower())
        for name, seconds in medians.items():
            bw = bandwidths[name]
            rec = {"bench": "adamw_bandwidth", "side": name, "leaves": leaves,
                   "params": n_params, "inner": args.inner, "ms": round(seconds * 1e3, 3),
                   "GBps": round(bw / 1e9, 1), "of_best_copy": round(bw / copy_bw, 3),
                   "device": device.device_kind, **versions}
            print(json.dumps(rec), flush=True)
            rows.append(rec)
        del sides
    print(f"\nAdamW on {n_params / 1e9:.2f}B float32 params, 1 {device.device_kind}, "
          f"{args.inner} step(s) per timed call; 'of copy' = of the fastest copy")
    print(f"{'side':20s} {'leaves':>6s} {'ms':>9s} {'GB/s':>9s} {'of copy':>8s}")
    for r in rows:
        print(f"{r['side']:20s} {r['leaves']:6d} {r['ms']:9.3f} {r['GBps']:9.1f} "
              f"{r['of_best_copy']:8.1%}")


if __name__ == "__main__":
    main()
