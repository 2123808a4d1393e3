"""Bytes of optimizer state per parameter, for each optimizer and storage option, on the
char GPT (no compute: shapes from `jax.eval_shape(tx.init, params)`).

Counts every array in the state (moments, preconditioner statistics and bases, step
counters, injected hyperparameters, 8-bit codes and their per-block scales) and divides
by the number of params; params are float32 (4 bytes/param not included).

    python benchmarks/optimizer_state_bytes.py [--d-model 256 --layers 4 --heads 8]
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtrain import transforms as T
from jaxtrain.models.registry import build


def cases():
    bf16 = jnp.bfloat16
    return {
        "adamw (optax)": optax.adamw(1e-3),
        "adamw (optax, mu bf16)": optax.adamw(1e-3, mu_dtype=bf16),
        "adamw": T.adamw(1e-3),
        "adamw mu_dtype=bf16": T.adamw(1e-3, mu_dtype=bf16),
        "adamw mu_dtype=nu_dtype=bf16": T.adamw(1e-3, mu_dtype=bf16, nu_dtype=bf16),
        "adamw state_dtype=bf16 (low_precision_state)": T.low_precision_state(T.adamw(1e-3)),
        "adamw_8bit (blocks of 256)": T.adamw_8bit(1e-3),
        "adamw_8bit (blocks of 2048)": T.adamw_8bit(1e-3, block_size=2048),
        "ademamix": T.ademamix(1e-3),
        "ademamix mu_dtype=bf16": T.ademamix(1e-3, mu_dtype=bf16),
        "mars": T.mars(1e-3),
        "mars mu_dtype=bf16": T.mars(1e-3, mu_dtype=bf16),
        "muon": T.muon(0.02),
        "muon mu_dtype=bf16": T.muon(0.02, mu_dtype=bf16),
        "soap": T.soap(3e-3),
        "soap mu_dtype=bf16": T.soap(3e-3, mu_dtype=bf16),
        "shampoo block 128": T.shampoo(1e-3),
        "shampoo block 128 mu_dtype=bf16": T.shampoo(1e-3, mu_dtype=bf16),
        "psgd_kron": T.psgd_kron(1e-3),
        "psgd_kron one_diag": T.psgd_kron(1e-3, memory_save_mode="one_diag"),
    }


def state_bytes(tx, params) -> int:
    shapes = jax.eval_shape(tx.init, params)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(shapes) if hasattr(x, "dtype")
               and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args()
    model = build("gpt", seed=0, vocab_size=256, d_model=args.d_model,
                  num_layers=args.layers, num_heads=args.heads, max_len=128)
    params = nnx.state(model, nnx.Param)
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    print(f"| optimizer | state bytes / param |  (GPT d_model {args.d_model}, "
          f"{args.layers} layers, {n:,} float32 params)")
    print("|---|---:|")
    for name, tx in cases().items():
        per = state_bytes(tx, params) / n
        print(json.dumps({"optimizer": name, "params": n, "state_bytes_per_param":
                          round(per, 3)}))
        print(f"| {name} | {per:.2f} |")


if __name__ == "__main__":
    main()
