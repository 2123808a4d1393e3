"""Shampoo, SOAP and PSGD Kron vmapped over learning rates, as `jaxtrain sweep` runs them:
the preconditioner refresh as `transforms.branch.vmappable_cond` (the refresh runs at the
steps it is due) against plain `lax.cond` (under vmap a select: it runs every step).

Params of the char GPT (`configs/char_gpt.yaml`: d_model 128, 5 layers, 1.0M params),
fixed random gradients, `--points` learning rates; one jitted call runs `--steps`
vmapped updates. Sides alternate; median seconds per step over `--reps`.

    OPENBLAS_NUM_THREADS=1 python benchmarks/vmapped_refresh.py [--steps 20] [--reps 5] [--only ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain import transforms as T
from jaxtrain.models import registry

# name -> (the module whose `vmappable_cond` is swapped, the optimizer at a learning rate);
# the package's `shampoo` and `soap` are the optimizers, hence import_module
OPTIMIZERS = {
    "shampoo": (importlib.import_module("jaxtrain.transforms.shampoo"),
                lambda lr: T.shampoo(lr, precondition_every=10)),
    "soap": (importlib.import_module("jaxtrain.transforms.soap"),
             lambda lr: T.soap(lr, precondition_frequency=10)),
    "psgd_kron": (importlib.import_module("jaxtrain.transforms.kron"),
                  lambda lr: T.psgd_kron(lr)),
}


def plain_cond(pred, true_fn, false_fn, *operands):
    return jax.lax.cond(pred, true_fn, false_fn, *operands)


def runner(make, module, cond, params, grads, rates, steps):
    """A compiled call `(states, params, grads) -> states` of `steps` vmapped updates,
    traced with `cond` as the module's (params and gradients are arguments: as constants
    XLA folded the statistics at compile time)."""
    def run(states, params, grads):
        def one(lr, state):
            tx = make(lr)
            return jax.lax.fori_loop(0, steps, lambda _, s: tx.update(grads, s, params)[1],
                                     state)
        return jax.vmap(one)(rates, states)

    kept = module.vmappable_cond
    module.vmappable_cond = cond
    try:
        states = jax.vmap(lambda lr: make(lr).init(params))(rates)
        return jax.jit(run, donate_argnums=0).lower(states, params, grads).compile()
    finally:
        module.vmappable_cond = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--only", default="shampoo,soap",
                        help=f"comma-separated: {', '.join(OPTIMIZERS)} (psgd_kron compiled "
                             "for over 5 minutes here)")
    args = parser.parse_args()
    model = registry.build("gpt", 0, vocab_size=256, d_model=128, num_layers=5, num_heads=4,
                           max_len=128)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape),
                         params)
    rates = jnp.geomspace(1e-4, 1e-2, args.points)
    for name in args.only.split(","):
        module, make = OPTIMIZERS[name]
        sides = {side: runner(make, module, cond, params, grads, rates, args.steps)
                 for side, cond in (("vmappable_cond", module.vmappable_cond),
                                    ("lax.cond", plain_cond))}
        init = jax.jit(jax.vmap(lambda lr, make=make: make(lr).init(params)))
        times = {side: [] for side in sides}
        for _ in range(args.reps):
            for side, call in sides.items():
                states = init(rates)
                jax.block_until_ready(states)
                t0 = time.perf_counter()
                jax.block_until_ready(call(states, params, grads))
                times[side].append((time.perf_counter() - t0) / args.steps)
        row = {"bench": "vmapped_refresh", "optimizer": name, "points": args.points,
               "steps": args.steps,
               **{f"{side} ms/step": round(1e3 * statistics.median(ts), 2)
                  for side, ts in times.items()}}
        row["speed-up"] = round(statistics.median(times["lax.cond"])
                                / statistics.median(times["vmappable_cond"]), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
