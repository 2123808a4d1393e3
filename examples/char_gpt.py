"""Train a byte-level GPT on the Python standard library's sources, then print a sample.

    python examples/char_gpt.py --steps 1500 --eval-every 250

The pieces are the library's: the `text` data set, `GPT`, an AdamW chain with warmup
and cosine decay, `TrainState`, `make_train_step`, `jaxtrain.sharding` and `fit`.
Prints one JSON line per evaluation (step, seconds, held-out loss in nats per byte).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import optax

from jaxtrain import sharding, transforms
from jaxtrain.data import batch_at
from jaxtrain.data.registry import load
from jaxtrain.models.annotate import param_count
from jaxtrain.models.registry import build
from jaxtrain.train import TrainState, evaluate, fit, make_eval_step, make_train_step
from jaxtrain.train.language_model import lm_loss, lm_metrics, lm_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=0, help="0: the whole validation set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    data = load("text", seq_len=args.seq_len)
    model = build("gpt", seed=args.seed, d_model=args.d_model, num_layers=args.layers,
                  num_heads=args.heads, max_len=args.seq_len)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps,
                                                  args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), transforms.adamw(schedule, b2=0.99,
                                                                      weight_decay=0.1))
    state = TrainState.create(model, tx, jax.random.key(args.seed))
    mesh = sharding.make_mesh(data=-1)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = sharding.place(state, shardings)
    step_fn = sharding.compile_step(make_train_step(lm_loss), mesh, shardings)
    eval_fn = sharding.compile_eval(make_eval_step(lm_metrics), mesh, shardings)
    valid = data["valid"]
    if args.eval_batches:
        valid = {k: v[: args.eval_batches * 64] for k, v in valid.items()}
    flops = model.flops_per_token(args.seq_len)
    print(json.dumps({"params": param_count(model), "train_flops_per_token": flops,
                      "train_windows": len(data["train"]["tokens"]),
                      "valid_windows": len(valid["tokens"])}), flush=True)

    start, cpu_start = time.perf_counter(), time.process_time()
    while int(state.step) < args.steps:
        until = min(int(state.step) + args.eval_every, args.steps)  # fit's steps: a total
        state, history = fit(state, step_fn,
                             lambda s: batch_at(data["train"], args.batch, args.seed, s),
                             until, mesh, log_every=50, progress=False)
        train_s = time.perf_counter() - start
        metrics = evaluate(eval_fn, state, valid, mesh, batch_size=64)
        step = int(state.step)
        print(json.dumps({"step": step, "seconds": round(time.perf_counter() - start, 1),
                          "cpu_seconds": round(time.process_time() - cpu_start, 1),
                          "train_loss": round(history[-1][1]["loss"], 4),
                          "valid_loss": round(metrics["loss"], 4),
                          "valid_accuracy": round(metrics["accuracy"], 4),
                          "tokens_per_s": round(step * args.batch * args.seq_len / train_s)}),
              flush=True)
    print(lm_sample(state.model(), data))


if __name__ == "__main__":
    main()
