"""Magnitude pruning of the digits CNN: train dense, then prune gradually (Zhu & Gupta
schedule) while fine-tuning, to 50%, 80% and 90% of the prunable kernels.

    python examples/prune_digits.py [--scope global|per_layer]

Prints one JSON line per target and a table of sparsity and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import optax
from flax import nnx

from jaxtrain import transforms
from jaxtrain.data import batch_at, digits_split
from jaxtrain.models import CNN
from jaxtrain.train import TrainState, classification_loss, make_train_step

DENSE_STEPS, PRUNE_STEPS, RAMP, BATCH, LR = 600, 600, 400, 64, 3e-3


def accuracy(state: TrainState, data: dict) -> float:
    model = state.model()
    model.eval()
    return float(np.mean(np.argmax(model(data["image"]), -1) == data["label"]))


def run(tx, state: TrainState, train: dict, steps: int, start: int) -> TrainState:
    state = TrainState.create(state.model(), tx, state.rng)
    step = jax.jit(make_train_step(classification_loss))
    for s in range(steps):
        state, _ = step(state, batch_at(train, BATCH, 0, start + s))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scope", default="global", choices=["global", "per_layer"])
    args = parser.parse_args()
    train, test = digits_split()
    with nnx.use_eager_sharding(False):
        model = CNN(num_classes=10, rngs=nnx.Rngs(0))
    dense = TrainState.create(model, transforms.adam(LR), jax.random.PRNGKey(0))
    dense = run(transforms.adam(LR), dense, train, DENSE_STEPS, 0)
    rows = [{"target": 0.0, "kernel_sparsity": 0.0, "total_sparsity": 0.0,
             "accuracy": accuracy(dense, test)}]
    print(json.dumps(rows[-1]))
    for target in (0.5, 0.8, 0.9):
        schedule = transforms.polynomial_sparsity(target, begin_step=0, end_step=RAMP)
        tx = optax.chain(transforms.adam(LR),
                         transforms.magnitude_prune(schedule, scope=args.scope,
                                                    update_every=10))
        pruned = run(tx, dense, train, PRUNE_STEPS, DENSE_STEPS)
        report = transforms.sparsity_report(pruned.params)
        kernels = [v for k, v in report.items() if k.endswith("kernel")]
        sizes = [x.size for p, x in zip(transforms.path_list(pruned.params),
                                        jax.tree.leaves(pruned.params), strict=True)
                 if p.endswith("kernel")]
        rows.append({"target": target,
                     "kernel_sparsity": float(np.average(kernels, weights=sizes)),
                     "total_sparsity": report["total"], "accuracy": accuracy(pruned, test)})
        print(json.dumps(rows[-1]))
    print(f"\n{'target':>8}{'kernel sparsity':>17}{'total sparsity':>16}{'accuracy':>10}")
    for r in rows:
        print(f"{r['target']:>8.0%}{r['kernel_sparsity']:>17.3f}{r['total_sparsity']:>16.3f}"
              f"{r['accuracy']:>10.4f}")


if __name__ == "__main__":
    main()
