"""Plain data parallelism vs local SGD vs DiLoCo on 8 simulated CPU devices (digits CNN):
final training / held-out loss and the all-reduce traffic per `H` steps, read from the
compiled HLO.

    python examples/local_sgd_digits.py [--steps 400] [--sync-every 8]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxtrain import sharding, transforms  # noqa: E402
from jaxtrain.data import batch_at, digits_split  # noqa: E402
from jaxtrain.models import CNN  # noqa: E402
from jaxtrain.strategies import (  # noqa: E402
    LocalSGDState,
    all_reduce_stats,
    local_sgd_shardings,
    make_local_sgd_round,
)
from jaxtrain.train import TrainState, classification_loss, make_train_step  # noqa: E402

BATCH, LR = 128, 3e-3  # global batch: 16 per replica


def held_out_loss(params, state: TrainState, test: dict) -> float:
    model = state.model(params)
    model.eval()
    return float(classification_loss(model, test, None)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sync-every", type=int, default=8)
    args = parser.parse_args()
    h, rounds = args.sync_every, args.steps // args.sync_every
    mesh = sharding.make_mesh(data=-1)
    train, test = digits_split()

    def fresh() -> TrainState:  # a new model each time: the compiled DP step donates buffers
        with nnx.use_eager_sharding(False):
            model = CNN(num_classes=10, rngs=nnx.Rngs(0))
        return TrainState.create(model, transforms.adam(LR), jax.random.PRNGKey(0))

    rows = []

    state = fresh()
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    step = sharding.compile_step(make_train_step(classification_loss), mesh, shardings)
    state = sharding.place(state, shardings)
    first = sharding.shard_batch(batch_at(train, BATCH, 0, 0), mesh)
    ops, nbytes = all_reduce_stats(step.lower(state, first).compile().as_text())
    for s in range(rounds * h):
        state, metrics = step(state, sharding.shard_batch(batch_at(train, BATCH, 0, s), mesh))
        # wait each step: hundreds of queued steps of 8 simulated devices on a 2-core CPU
        # can starve XLA's collective rendezvous
        jax.block_until_ready(metrics)
    rows.append({"run": "data parallel", "train_loss": float(metrics["loss"]),
                 "test_loss": held_out_loss(state.params, state, test),
                 "all_reduces_per_H_steps": ops * h, "bytes_per_H_steps": nbytes * h})
    print(json.dumps(rows[-1]))

    for run, outer in (("local SGD (average)", optax.sgd(1.0)),
                       ("DiLoCo (nesterov 0.7)", optax.sgd(0.7, momentum=0.9, nesterov=True))):
        base = fresh()
        local = LocalSGDState.create(base, outer, mesh.shape["data"])
        local = jax.device_put(local, local_sgd_shardings(local, mesh))
        round_fn = make_local_sgd_round(classification_loss, mesh, h)
        stack = lambda r: jax.tree.map(lambda *x: np.stack(x),
                                       *[batch_at(train, BATCH, 0, r * h + t) for t in range(h)])
        ops, nbytes = all_reduce_stats(round_fn.lower(local, stack(0)).compile().as_text())
        for r in range(rounds):
            local, losses = jax.block_until_ready(round_fn(local, stack(r)))
        rows.append({"run": run, "train_loss": float(np.mean(np.asarray(losses)[:, -1])),
                     "test_loss": held_out_loss(local.params, base, test),
                     "all_reduces_per_H_steps": ops, "bytes_per_H_steps": nbytes})
        print(json.dumps(rows[-1]))

    print(f"\nH={h}, {rounds * h} steps, global batch {BATCH}, 8 replicas")
    print(f"{'run':<24}{'train loss':>11}{'test loss':>11}{'all-reduces/H':>15}{'MB/H':>8}")
    for r in rows:
        print(f"{r['run']:<24}{r['train_loss']:>11.4f}{r['test_loss']:>11.4f}"
              f"{r['all_reduces_per_H_steps']:>15}{r['bytes_per_H_steps'] / 1e6:>8.3f}")


if __name__ == "__main__":
    main()
