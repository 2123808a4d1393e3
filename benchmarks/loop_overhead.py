"""Steps per second of `Trainer.fit` versus a bare hand-written jitted loop.

Same model, optimizer, data and batch feed on both sides (one device). The bare loop is
`device_put(batch)`, a jitted value-and-grad + Optax update with donated buffers, and
nothing else. `Trainer.fit` runs with its defaults (nan_policy='raise', metrics every 10
steps, progress off, no logs or checkpoints), at steps_per_call=1 and =8. Sides alternate
within one process; the ratio is taken per repetition and its median reported.
`--optax` gives both sides Optax's own Adam instead of jaxtrain's, so that the ratio
measures the Trainer alone when two trees whose optimizers differ are compared.

    python benchmarks/loop_overhead.py [--reps 7] [--steps 320] [--optax] [--only mlp]
    (the GPT runs steps / 5)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import optax
from flax import nnx

from jaxtrain import transforms
from jaxtrain.data import digits_split
from jaxtrain.data.text import load_text
from jaxtrain.models import registry
from jaxtrain.train import (
    Batches,
    LoggingConfig,
    TrainConfig,
    Trainer,
    TrainerConfig,
    TrainState,
    classification_loss,
)
from jaxtrain.train.language_model import lm_loss


def bare_runner(model, tx, loss_fn, feed):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def objective(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, None)[0]

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    carry = {"params": params, "opt": opt_state, "pos": 0}
    device = jax.devices()[0]

    def run(steps: int) -> float:
        start = time.perf_counter()
        params, opt_state, loss = carry["params"], carry["opt"], None
        for i in range(steps):
            batch = jax.device_put(feed.get(carry["pos"] + i, 1), device)
            params, opt_state, loss = step(params, opt_state, batch)
        jax.block_until_ready(loss)
        carry.update(params=params, opt=opt_state, pos=carry["pos"] + steps)
        return steps / (time.perf_counter() - start)

    return run


def trainer_runner(model, tx, loss_fn, data, batch_size, steps_per_call):
    state = TrainState.create(model, tx, jax.random.PRNGKey(0))
    config = TrainerConfig(train=TrainConfig(batch_size=batch_size,
                                             steps_per_call=steps_per_call),
                           logging=LoggingConfig(progress=False, plots=False))
    trainer = Trainer(state, loss_fn, config)
    target = {"steps": 0}

    def run(steps: int) -> float:
        start = time.perf_counter()
        target["steps"] += steps
        jax.block_until_ready(trainer.fit(data, target["steps"]).params)
        return steps / (time.perf_counter() - start)

    return run


def cases():
    train, _ = digits_split()
    yield ("mlp", lambda: registry.build("mlp", 0, in_features=64, out_features=10,
                                         hidden=(128, 128)),
           classification_loss, train, 64, (1, 8), 1)
    text = load_text(seq_len=64)["train"]
    yield ("gpt", lambda: registry.build("gpt", 0, vocab_size=256, d_model=64, num_layers=2,
                                         num_heads=4, max_len=64),
           lm_loss, text, 16, (1,), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--optax", action="store_true",
                        help="optax.adam on both sides instead of jaxtrain's transforms.adam")
    parser.add_argument("--only", choices=("mlp", "gpt"), help="one model only")
    args = parser.parse_args()
    rows = []
    for name, build, loss_fn, data, batch_size, spcs, fewer in cases():
        if args.only not in (None, name):
            continue
        steps = args.steps // fewer
        tx = optax.adam(1e-3) if args.optax else transforms.adam(1e-3)
        sides = {"bare": bare_runner(build(), tx, loss_fn, Batches(data, batch_size, 0))}
        for k in spcs:
            sides[f"fit k={k}"] = trainer_runner(build(), tx, loss_fn, data, batch_size, k)
        for run in sides.values():  # compile and warm up (k-step calls and single steps)
            run(2 * max(spcs) + 1)
        rates = {side: [] for side in sides}
        for rep in range(args.reps):
            for side, run in sides.items():
                rate = run(steps)
                rates[side].append(rate)
                print(json.dumps({"model": name, "side": side, "rep": rep,
                                  "steps_per_second": round(rate, 1)}))
        for side in sides:
            if side == "bare":
                continue
            ratios = [a / b for a, b in zip(rates[side], rates["bare"], strict=True)]
            row = {"model": name, "side": side, "median_ratio": round(statistics.median(ratios), 3),
                   "bare_steps_per_second": round(statistics.median(rates["bare"]), 1),
                   "fit_steps_per_second": round(statistics.median(rates[side]), 1)}
            print(json.dumps(row))
            rows.append(row)
    print(f"\n{'model':<6}{'side':<10}{'bare it/s':>11}{'fit it/s':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<6}{r['side']:<10}{r['bare_steps_per_second']:>11}"
              f"{r['fit_steps_per_second']:>11}{r['median_ratio']:>8}")


if __name__ == "__main__":
    main()
