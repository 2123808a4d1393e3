"""Full-batch training of the digits MLP: Hessian-free Newton (`newton_cg`), exact
`newton`, `lbfgs` and Adam for the same number of optimizer steps, from the same init.

Every method goes through `jaxtrain.train.make_train_step` (which hands the second-order
methods `value_fn`), jitted, on the whole training set each step. Prints one JSON line
per method and seed, then a table: training loss after the steps (mean and spread over
seeds), held-out accuracy, and seconds per step (compile excluded; noisy on a shared CPU).
Adam's learning rate is the best of a small grid, chosen per seed on the final training
loss (which favours Adam).

    python benchmarks/second_order.py [--steps 30] [--seeds 0,1,2] [--hidden 16]
        [--methods newton_cg,newton,lbfgs,adam]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import transforms
from jaxtrain.data import registry as data_registry
from jaxtrain.models.registry import build
from jaxtrain.train import TrainState, make_train_step
from jaxtrain.train.tasks import get_task

ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2)


def methods():
    return {
        "newton_cg": transforms.newton_cg(),
        "newton": transforms.newton(),
        "lbfgs": transforms.lbfgs(),
        "adam": transforms.adam(ADAM_RATES[0]),
    }


def runner(tx):
    """`run(seed, steps, hyper) -> (final train loss, held-out accuracy, s/step, losses)`,
    compiled once for the transform `tx`."""
    task = get_task("classification")
    step = jax.jit(make_train_step(task.loss_fn), donate_argnums=(0,))

    def run(data, hidden, seed, steps, **hyper):
        model = build("mlp", seed, in_features=64, out_features=10, hidden=hidden)
        state = TrainState.create(model, tx, jax.random.PRNGKey(seed))
        if hyper:
            state = state.replace(opt_state=transforms.set_hyperparams(state.opt_state,
                                                                       **hyper))
        # a copy: small constants may share one buffer, which donation would consume twice
        state = jax.tree.map(jnp.copy, state)
        state, metrics = step(state, data["train"])  # compiles on the first run
        losses = [float(metrics["loss"])]
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            state, metrics = step(state, data["train"])
            losses.append(float(metrics["loss"]))
        seconds = (time.perf_counter() - t0) / max(1, steps - 1)
        final, _ = task.loss_fn(state.model(train=False), data["train"], None)
        values = task.metric_fn(state.model(train=False), data["valid"])
        return float(final), float(np.mean(values["accuracy"])), seconds, losses

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--hidden", default="16")
    parser.add_argument("--methods", default="newton_cg,newton,lbfgs,adam")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    hidden = [int(h) for h in args.hidden.split(",")]
    data = data_registry.load("digits", test_fraction=0.25)

    rows = {}
    for name, tx in methods().items():
        if name not in args.methods.split(","):
            continue
        run = runner(tx)
        for seed in seeds:
            hyper = {}
            if name == "adam":  # the best rate of the grid for this seed
                finals = {lr: run(data, hidden, seed, args.steps, learning_rate=lr)[0]
                          for lr in ADAM_RATES}
                hyper = {"learning_rate": min(finals, key=finals.get)}
            loss, acc, seconds, curve = run(data, hidden, seed, args.steps, **hyper)
            rows.setdefault(name, []).append((loss, acc, seconds))
            print(json.dumps({"method": name, **hyper, "seed": seed, "steps": args.steps,
                              "hidden": hidden, "final_train_loss": loss,
                              "valid_accuracy": acc, "seconds_per_step": seconds,
                              "loss_per_step": [round(v, 5) for v in curve]}), flush=True)
    print(f"\ndigits MLP hidden={hidden}, full batch ({len(data['train']['label'])} examples), "
          f"{args.steps} steps, seeds {seeds}")
    print(f"{'method':<10}  {'train loss (mean ± std)':<24}  {'held-out acc':<12}  s/step")
    for key, values in sorted(rows.items(), key=lambda kv: np.mean([v[0] for v in kv[1]])):
        loss, acc, sec = (np.array(c) for c in zip(*values, strict=True))
        print(f"{key:<10}  {loss.mean():.3e} ± {loss.std():.1e}       {acc.mean():.4f}"
              f"        {np.median(sec):.4f}")


if __name__ == "__main__":
    main()
