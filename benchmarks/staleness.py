"""The effect of bounded gradient staleness on the digits task: held-out accuracy after
N steps with `stale_gradients(tx, delay)` for delay 0 (synchronous), 1, 4 and 16.

Each run: a model from the registry, digits 0-9 (75/25 split), batch 64, the optimizer
wrapped by `jaxtrain.transforms.stale_gradients`; held-out accuracy every `--every`
steps. Prints one JSON line per (optimizer, delay, seed) and a table of the mean and
spread over seeds at the final step and at the first checkpoint.

    python benchmarks/staleness.py [--model mlp] [--steps 400] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp

from jaxtrain import transforms
from jaxtrain.data import batch_at, digits_split
from jaxtrain.models.registry import build
from jaxtrain.train import TrainState, classification_loss, make_train_step

OPTIMIZERS = {
    "sgd 0.1": lambda: transforms.sgd(0.1),
    "sgd 0.1 momentum 0.9": lambda: transforms.sgd(0.1, momentum=0.9),
    "adam 3e-3": lambda: transforms.adam(3e-3),
}
MODEL_KWARGS = {"mlp": {"in_features": [8, 8], "hidden": [128, 128]}, "cnn": {}}


def run(model: str, tx, delay: int, seed: int, steps: int, every: int, data) -> list:
    train, valid = data
    net = build(model, seed, **MODEL_KWARGS[model])
    state = TrainState.create(net, transforms.stale_gradients(tx, delay),
                              jax.random.PRNGKey(seed))
    step = jax.jit(make_train_step(classification_loss), donate_argnums=0)

    @jax.jit
    def accuracy(state):
        logits = state.model(train=False)(valid["image"])
        return jnp.mean(jnp.argmax(logits, -1) == valid["label"])

    curve = []
    for s in range(steps):
        state, _ = step(state, batch_at(train, 64, seed, s))
        if (s + 1) % every == 0:
            curve.append((s + 1, float(accuracy(state))))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(MODEL_KWARGS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--delays", default="0,1,4,16")
    args = parser.parse_args()
    data = digits_split(tuple(range(10)), seed=0)
    delays = [int(d) for d in args.delays.split(",")]
    rows = []
    for name, make in OPTIMIZERS.items():
        for delay in delays:
            curves = [run(args.model, make(), delay, seed, args.steps, args.every, data)
                      for seed in range(args.seeds)]
            for seed, curve in enumerate(curves):
                print(json.dumps({"optimizer": name, "delay": delay, "seed": seed,
                                  "model": args.model, "curve": curve}), flush=True)
            finals = [c[-1][1] for c in curves]
            firsts = [c[0][1] for c in curves]
            rows.append((name, delay, firsts, finals))
    first_step = args.every
    print(f"\n| optimizer | delay | accuracy @ {first_step} | accuracy @ {args.steps} |")
    print("|---|---:|---:|---:|")
    for name, delay, firsts, finals in rows:
        fmt = lambda xs: (f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"
                          if len(xs) > 1 else f"{xs[0]:.3f}")
        print(f"| {name} | {delay} | {fmt(firsts)} | {fmt(finals)} |")


if __name__ == "__main__":
    main()
