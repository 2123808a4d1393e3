"""What the train step's metrics cost on a small model: compiled calls only, no loop.

The digits MLP (64-128-128-10, batch 64, Adam), one device, the same batch each call:
`make_train_step` returning all its metrics, only the loss, and all but the gradient norm,
against a bare value-and-grad + Optax update. Steps per second, median of `--reps`.

    python benchmarks/step_metrics_cost.py [--reps 3] [--steps 640]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import optax

from jaxtrain.data import batch_at, digits_split
from jaxtrain.models import registry
from jaxtrain.train import TrainState, classification_loss, make_train_step


def steps_per_second(step, state, batch, steps: int, reps: int) -> float:
    state, _ = step(state, batch)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps):
            state, out = step(state, batch)
        jax.block_until_ready(out)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=640)
    args = parser.parse_args()
    train, _ = digits_split()
    batch = jax.device_put(batch_at(train, 64, 0, 0))
    make = lambda: registry.build("mlp", 0, in_features=64, out_features=10, hidden=(128, 128))
    tx = optax.adam(1e-3)
    full = make_train_step(classification_loss)

    def only_loss(state, b):
        state, metrics = full(state, b)
        return state, metrics["loss"]

    def no_grad_norm(state, b):
        state, metrics = full(state, b)
        metrics.pop("grad_norm")
        return state, metrics

    def bare(state, b):
        params, opt_state = state
        model = lambda p: classification_loss(graph_model(p), b, None)[0]
        loss, grads = jax.value_and_grad(model)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    base = TrainState.create(make(), tx, jax.random.PRNGKey(0))
    graph_model = lambda p: base.model(p)
    cases = {"make_train_step, all metrics": full, "only the loss": only_loss,
             "all metrics but grad_norm": no_grad_norm}
    results = {}
    for name, fn in cases.items():
        state = TrainState.create(make(), tx, jax.random.PRNGKey(0))
        results[name] = steps_per_second(jax.jit(fn, donate_argnums=(0,)), state, batch,
                                         args.steps, args.reps)
    params = jax.tree.map(lambda x: x + 0, base.params)
    results["bare value-and-grad + Optax"] = steps_per_second(
        jax.jit(bare, donate_argnums=(0,)), (params, tx.init(params)), batch, args.steps,
        args.reps)
    for name, rate in results.items():
        print(json.dumps({"bench": "step_metrics_cost", "case": name,
                          "steps_per_second": round(rate, 1)}), flush=True)
    print(f"\n{'case':32s} {'steps/s':>9s}")
    for name, rate in results.items():
        print(f"{name:32s} {rate:9.0f}")


if __name__ == "__main__":
    main()
