"""GPT training throughput and MFU: jaxtrain's compiled step vs a bare hand-written loop.

Both sides train the same GPT on the same random tokens with AdamW, one process,
alternating: ours is `train.make_train_step(lm_loss, precision=...)` compiled by
`sharding.compile_step` with a preset (`dp` and `fsdp`); the bare loop is `jax.jit` of
value-and-grad through `nnx.merge` plus an Optax update, donated, nothing else. Reports
tokens/s, MFU (model FLOPs from `GPT.flops_per_token` over the chip's peak: the dense
bf16 peak on a known GPU, else a measured float32 matmul peak on this CPU), the ratio
to the bare loop, and the compile time of the train step.

    python benchmarks/mfu.py                     # a small GPT, CPU-sized
    python benchmarks/mfu.py --gpt2-small        # 124M params, seq 1024, bf16 (a GPU)

`--gpt2-small` is GPT-2 small's shape (learned positions, tied embeddings, LayerNorm,
vocabulary padded to 50304) at batch 16 x 1024 tokens per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtrain import sharding
from jaxtrain.models import GPT
from jaxtrain.models.gpt import attention_implementation
from jaxtrain.train import TrainState, make_train_step
from jaxtrain.train.language_model import lm_loss
from jaxtrain.train.precision import get_policy
from jaxtrain.train.state import param_logical_axes

# Dense bf16 peak FLOP/s by device kind (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device) -> tuple[float, str]:
    """The device's peak FLOP/s and where the figure comes from."""
    for name, peak in PEAK_BF16.items():
        if name in device.device_kind:
            return peak, f"{name} dense bf16 datasheet peak"
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ a)
    x = mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        x = mm(x)
    x.block_until_ready()
    return 10 * 2 * n**3 / (time.perf_counter() - t0), "measured float32 matmul peak"


def bare_loop(model, tx, policy):
    """The hand-written reference: merge, loss, grad, Optax update; donated."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def loss_fn(p, tokens):
        p = jax.tree.map(lambda x: x.astype(policy.compute_dtype), p)
        logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(state, tokens):
        p, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0,))
    return step, (params, tx.init(params))


def timed(step, state, batches, n):
    state, loss = step(state, batches[0])  # warm
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for i in range(n):
        state, out = step(state, batches[i % len(batches)])
    jax.block_until_ready(out)
    return time.perf_counter() - t0, state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpt2-small", action="store_true")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="8; 16 with --gpt2-small")
    parser.add_argument("--positions", default=None,
                        help="rotary (default) or learned (GPT-2's, the --gpt2-small default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--attention", default="auto", help="auto, xla or cudnn")
    args = parser.parse_args()
    if args.gpt2_small:
        args.d_model, args.layers, args.heads, args.vocab, args.seq = 768, 12, 12, 50304, 1024
    args.batch = args.batch or (16 if args.gpt2_small else 8)
    args.positions = args.positions or ("learned" if args.gpt2_small else "rotary")
    device = jax.devices()[0]
    policy = get_policy(args.precision)
    compute = jnp.dtype(policy.compute_dtype).name
    peak, peak_source = peak_flops(device)
    head = jnp.zeros((1, 1, 1, args.d_model // args.heads), policy.compute_dtype)
    kernel = attention_implementation(args.attention, head)
    kw = dict(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
              num_heads=args.heads, max_len=args.seq, attention=args.attention,
              positions=args.positions)
    make = lambda: GPT(**kw, rngs=nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model = make()
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    flops_per_step = model.flops_per_token(args.seq) * args.batch * args.seq
    tokens_per_step = args.batch * args.seq
    rng = np.random.default_rng(0)  # seq + 1 tokens: the model reads seq, predicts seq
    batches = [jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), jnp.int32)
               for _ in range(4)]
    tx = optax.adamw(3e-4, weight_decay=0.1)
    mesh = sharding.make_mesh(devices=[device])

    sides = {}
    for preset in ("dp", "fsdp"):
        with nnx.use_eager_sharding(False):
            m = make()
        state = TrainState.create(m, tx, jax.random.PRNGKey(0))
        shardings = sharding.state_shardings(state, mesh, preset, param_logical_axes(m))
        state = sharding.place(jax.tree.map(jnp.copy, state), shardings)
        step = sharding.compile_step(make_train_step(lm_loss, precision=policy), mesh, shardings)
        t0 = time.perf_counter()
        step = step.lower(state, {"tokens": batches[0]}).compile()
        compile_s = time.perf_counter() - t0
        sides[f"jaxtrain {preset}"] = (lambda s, b, step=step: step(s, {"tokens": b}),
                                       state, compile_s)
    with nnx.use_eager_sharding(False):
        bare, bare_state = bare_loop(make(), tx, policy)
    t0 = time.perf_counter()
    bare = bare.lower(bare_state, batches[0]).compile()
    sides["bare loop"] = (bare, bare_state, time.perf_counter() - t0)

    rates = {name: [] for name in sides}
    states = {name: s for name, (_, s, _) in sides.items()}
    for rep in range(args.reps):
        for name, (step, _, compile_s) in sides.items():
            seconds, states[name] = timed(step, states[name], batches, args.steps)
            rates[name].append(tokens_per_step * args.steps / seconds)
            print(json.dumps({"bench": "mfu", "side": name, "rep": rep,
                              "tokens_per_s": round(rates[name][-1], 1),
                              "mfu": rates[name][-1] / tokens_per_step * flops_per_step / peak,
                              "compile_s": round(compile_s, 2), "params": n_params,
                              "device": device.device_kind, "compute": compute}),
                  flush=True)
    print(f"\nGPT {n_params / 1e6:.1f}M params ({args.positions} positions), seq {args.seq}, "
          f"batch {args.batch}, "
          f"{compute} compute, 1 {device.device_kind}; peak {peak / 1e12:.2f} TFLOP/s "
          f"({peak_source}); attention kernel {kernel}")
    bare_rates = rates["bare loop"]
    for name, values in rates.items():
        ratios = [a / b for a, b in zip(values, bare_rates, strict=True)]
        med = statistics.median(values)
        mfu = med / tokens_per_step * flops_per_step / peak
        print(f"  {name:14s} {med:12.0f} tokens/s  MFU {mfu:6.1%}"
              f"  vs bare {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f})  compile {sides[name][2]:.1f} s")


if __name__ == "__main__":
    main()
