"""Per-device memory of a GPT train step under N-way `fsdp` and `tp`, from the compiled step.

For each placement the AdamW train step is compiled by `sharding.compile_step` on 8
simulated CPU devices; the per-device bytes of params and optimizer state are summed
from the compiled step's input shardings (the shard shape of every leaf), and the
argument / temporary bytes come from its `memory_analysis()`. Target: per-device
params + optimizer state at most 1/N of the unsharded figure plus 10%.

    python benchmarks/sharding_memory.py [--d-model 256 --layers 4 --heads 8]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxtrain import sharding  # noqa: E402
from jaxtrain.models import GPT, logical_axes  # noqa: E402

PLACEMENTS = [("dp", dict(data=8), 1)] + [
    ("fsdp", dict(data=8 // n, fsdp=n), n) for n in (1, 2, 4, 8)
] + [("tp", dict(data=8 // n, tensor=n), n) for n in (2, 4, 8)]


def build(args):
    with nnx.use_eager_sharding(False):
        model = GPT(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, max_len=args.seq, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    axes = logical_axes(params)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)

    def step(state, batch):
        def loss(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt}, {
            "loss": value}

    state = {"params": params, "opt_state": tx.init(params)}
    return state, axes, step


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (the first device's shards)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def measure(state, axes, step, preset, sizes, ways, batch):
    mesh = sharding.make_mesh(**sizes)
    shardings = sharding.state_shardings(state, mesh, preset, axes)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
    compiled = sharding.compile_step(step, mesh, shardings).lower(
        abstract, jax.ShapeDtypeStruct(batch.shape, batch.dtype,
                                       sharding=sharding.batch_sharding(mesh))).compile()
    ins = compiled.input_shardings[0][0]
    mem = compiled.memory_analysis()
    return {
        "bench": "sharding_memory", "placement": f"{preset} {ways}-way", "mesh": sizes,
        "params_bytes": per_device_bytes(state["params"], ins["params"]),
        "opt_state_bytes": per_device_bytes(state["opt_state"], ins["opt_state"]),
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "ways": ways,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    state, axes, step = build(args)
    batch = jnp.zeros((args.batch, args.seq + 1), jnp.int32)
    rows = [measure(state, axes, step, p, s, n, batch) for p, s, n in PLACEMENTS]
    full = rows[0]["params_bytes"] + rows[0]["opt_state_bytes"]
    for row in rows:
        row["state_fraction"] = (row["params_bytes"] + row["opt_state_bytes"]) / full
        row["target_fraction"] = 1.1 / row["ways"]
        row["meets_target"] = row["state_fraction"] <= row["target_fraction"]
        print(json.dumps(row))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"\nGPT d_model={args.d_model} layers={args.layers} heads={args.heads} "
          f"vocab={args.vocab}: {n_params:,} params; AdamW; batch {args.batch}x{args.seq}; "
          "per-device MiB")
    print(f"{'placement':<12} {'params':>8} {'opt':>8} {'args':>8} {'temp':>8} "
          f"{'state/full':>10} {'target':>7}")
    mib = 2.0 ** 20
    for r in rows:
        print(f"{r['placement']:<12} {r['params_bytes'] / mib:8.2f} "
              f"{r['opt_state_bytes'] / mib:8.2f} {r['argument_bytes'] / mib:8.2f} "
              f"{r['temp_bytes'] / mib:8.2f} {r['state_fraction']:10.3f} "
              f"{r['target_fraction']:7.3f}")


if __name__ == "__main__":
    main()
