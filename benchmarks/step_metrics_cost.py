"""What the train step's parts cost on a small model: compiled calls, no Trainer.

The digits MLP (64-128-128-10, batch 64, Adam), one device, the same batch each call:
`make_train_step` returning all its metrics, only the loss, all but the gradient norm,
none (what the Trainer's calls between log points returned before one compiled call per
step count), and with a key split carried in the state
(what the step did before keys became `fold_in(rng, step)`); the bare value-and-grad +
Optax update one step per call and 8 per call in a rolled and an unrolled `lax.scan`; and
all metrics read on the host every 10th call, 10 calls later, blocking or once computed.
Steps per second, median of `--reps`.

    python benchmarks/step_metrics_cost.py [--reps 3] [--steps 640]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import optax
from jax import numpy as jnp

from jaxtrain.data import batch_at, digits_split
from jaxtrain.models import registry
from jaxtrain.train import TrainState, classification_loss, make_train_step


def steps_per_second(step, state, batch, steps: int, reps: int, per_call: int = 1,
                     read_every: int = 0, wait: bool = True) -> float:
    """Calls of `step` (each `per_call` steps); with `read_every`, the outputs of every
    such call are read on the host `read_every` calls later (`wait`: blocking; else once
    computed)."""
    state, _ = step(state, batch)
    rates = []
    for _ in range(reps):
        pending = []
        start = time.perf_counter()
        for i in range(steps // per_call):
            state, out = step(state, batch)
            if read_every and i % read_every == 0:
                pending.append(out)
                while pending and (wait and len(pending) > 1 or all(
                        x.is_ready() for x in jax.tree.leaves(pending[0]))):
                    jax.device_get(pending.pop(0))
        jax.block_until_ready(out)
        jax.device_get(pending)
        rates.append(steps // per_call * per_call / (time.perf_counter() - start))
    return statistics.median(rates)


def without_metrics(call):
    """`call` returning only the step counter (what the Trainer's calls between log points
    returned until one compiled call per step count replaced them)."""

    def quiet(state, b):
        state = call(state, b)[0]
        return state, {"step": state.step}

    return quiet


def scanned(step, unroll):
    """8 steps per call over the same batch."""
    return lambda state, b: jax.lax.scan(lambda s, _: step(s, b), state, length=8,
                                         unroll=unroll)


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

    def split_key(state, b):
        state, metrics = full(state, b)
        return state.replace(rng=jax.random.split(state.rng)[0]), metrics

    base = TrainState.create(make(), tx, jax.random.PRNGKey(0))
    graph_model = lambda p: base.model(p)
    cases = {"make_train_step, all metrics": (full, {}), "only the loss": (only_loss, {}),
             "all metrics but grad_norm": (no_grad_norm, {}),
             "no metrics": (without_metrics(full), {}),
             "all metrics, key split in state": (split_key, {}),
             "all metrics, read blocking": (full, {"read_every": 10}),
             "all metrics, read when computed": (full, {"read_every": 10, "wait": False})}
    results = {}
    for name, (fn, options) in cases.items():
        state = TrainState.create(make(), tx, jax.random.PRNGKey(0))
        results[name] = steps_per_second(jax.jit(fn, donate_argnums=(0,)), state, batch,
                                          args.steps, args.reps, **options)
    bare_cases = {"bare value-and-grad + Optax": (bare, 1),
                  "bare, 8 per call, rolled scan": (scanned(bare, 1), 8),
                  "bare, 8 per call, unrolled scan": (scanned(bare, True), 8)}
    for name, (fn, per_call) in bare_cases.items():
        params = jax.tree.map(jnp.copy, base.params)
        results[name] = steps_per_second(jax.jit(fn, donate_argnums=(0,)),
                                         (params, tx.init(params)), batch, args.steps,
                                         args.reps, per_call)
    for name, rate in results.items():
        print(json.dumps({"bench": "step_metrics_cost", "case": name,
                          "steps_per_second": round(rate, 1)}), flush=True)
    print(f"\n{'case':32s} {'steps/s':>9s}")
    for name, rate in results.items():
        print(f"{name:32s} {rate:9.0f}")


if __name__ == "__main__":
    main()
