"""Where a GPT train step's time goes: the bare loop of `mfu.py` timed in variants.

Forward only, forward + backward, the full step (+ AdamW), and the full step with one
thing changed (vocabulary 256, one layer, XLA attention, untied embeddings, learned positions,
twice the batch), next to the
rate of the step's two kinds of matmul alone. Each line: milliseconds per call and the
model FLOP/s it implies. Meant for a GPU; `--small` shrinks everything for a CPU check.

    python benchmarks/gpt_breakdown.py            # GPT-2 small, seq 1024, batch 16, bf16
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conv_vmap import median_ms
from flax import nnx
from mfu import bare_loop

from jaxtrain.models import GPT
from jaxtrain.train.precision import get_policy


def timed(fn, *args) -> float:
    """Median seconds of 10 calls of `fn(*args)`, after a warm-up call (compile)."""
    return median_ms(fn, args, runs=10) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    base = dict(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, max_len=1024)
    batch = 16
    if args.small:
        base, batch = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
                           max_len=64), 4
    policy = get_policy("auto")
    rng = np.random.default_rng(0)
    tx = optax.adamw(3e-4, weight_decay=0.1)

    def tokens(b, vocab):
        return jnp.asarray(rng.integers(0, vocab, (b, base["max_len"] + 1)), jnp.int32)

    def model(**change):
        with nnx.use_eager_sharding(False):
            return GPT(**{**base, **change}, rngs=nnx.Rngs(0))

    def step_seconds(b=batch, **change):
        m = model(**change)
        flops = m.flops_per_token(base["max_len"]) * b * (base["max_len"])
        step, state = bare_loop(m, tx, policy)
        data = tokens(b, m.config["vocab_size"])
        carry = [state]

        def call():
            carry[0], loss = step(carry[0], data)
            return loss

        return timed(call), flops

    rows = []

    def row(name, seconds, flops):
        rows.append((name, seconds, flops))
        print(f"{name:34s} {seconds * 1e3:9.2f} ms {flops / seconds / 1e12:8.1f} TFLOP/s",
              flush=True)

    m = model()
    flops = m.flops_per_token(base["max_len"]) * batch * (base["max_len"])
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(policy.compute_dtype), nnx.to_pure_dict(params))
    rest = nnx.to_pure_dict(rest)
    data = tokens(batch, base["vocab_size"])

    def loss_fn(p, t):
        logits = nnx.merge(graphdef, p, rest)(t[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

    row("forward (loss)", timed(jax.jit(loss_fn), params, data), flops / 3)
    row("forward + backward", timed(jax.jit(jax.value_and_grad(loss_fn)), params, data), flops)
    row("full step (+ AdamW)", *step_seconds())
    row("full step, vocab 256", *step_seconds(vocab_size=256))
    row("full step, 1 layer", *step_seconds(num_layers=1))
    row("full step, XLA attention", *step_seconds(attention="xla"))
    row("full step, untied embeddings", *step_seconds(tie_embeddings=False))
    row("full step, learned positions", *step_seconds(positions="learned"))
    row(f"full step, batch {2 * batch}", *step_seconds(b=2 * batch))
    t = batch * (base["max_len"])
    d, v = base["d_model"], base["vocab_size"]
    for name, (k, n) in {"matmul (tokens x d) @ (d x 4d)": (d, 4 * d),
                         "matmul (tokens x d) @ (d x vocab)": (d, v)}.items():
        a = jax.random.normal(jax.random.key(1), (t, k), policy.compute_dtype)
        b = jax.random.normal(jax.random.key(2), (k, n), policy.compute_dtype)
        row(name, timed(jax.jit(jnp.matmul), a, b), 2 * t * k * n)
    print(f"\n{jax.devices()[0].device_kind}, {jnp.dtype(policy.compute_dtype).name} compute, "
          f"batch {batch} x seq {base['max_len']}; jax {jax.__version__}")


if __name__ == "__main__":
    main()
