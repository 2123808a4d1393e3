"""Why convolutional sweeps are slow on XLA:CPU: a 3x3 convolution plain, vmapped over 16
weight sets (a grouped convolution), the same as im2col + matmul (vmapped: a batched
matmul), and 10 gradient steps inside `lax.scan` vs unrolled.

Prints one JSON line per measurement and a table (median of `--runs` timings, ms).

    python benchmarks/conv_vmap.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x, w):
    """The same convolution as nine shifted slices and one matmul."""
    n, h, wd, c = x.shape
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([p[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], -1)
    return patches @ w.reshape(9 * c, -1)


def cnn_step(conv_fn, batch: int = 64):
    """One SGD step of the digits CNN's shapes (two 3x3 convs, pooling, two dense layers),
    written out so that the convolution is `conv_fn`."""
    def loss(p, x, y):
        h = jax.nn.relu(conv_fn(x, p["w1"]) + p["b1"])
        h = jax.nn.relu(conv_fn(h, p["w2"]) + p["b2"])
        h = h.reshape(batch, 4, 2, 4, 2, 32).mean((2, 4)).reshape(batch, -1)
        logits = jax.nn.relu(h @ p["w3"] + p["b3"]) @ p["w4"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), y])

    def step(p, x, y):
        return jax.tree.map(lambda a, g: a - 0.01 * g, p, jax.grad(loss)(p, x, y))

    return step


def median_ms(fn, args, runs: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--points", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
    xs, ws = jnp.stack([x] * args.points), jnp.stack([w] * args.points)
    wgrad = lambda x, w: jax.grad(lambda w: jnp.tanh(conv(x, w)).sum())(w)
    igrad = lambda x, w: jax.grad(lambda w: jnp.tanh(conv_im2col(x, w)).sum())(w)
    step = lambda w, _: (w - 1e-3 * wgrad(x, w), None)
    cases = {
        "conv, one weight set": (jax.jit(conv), (x, w)),
        f"conv, vmapped over {args.points} weight sets": (jax.jit(jax.vmap(conv)), (xs, ws)),
        "im2col conv, one": (jax.jit(conv_im2col), (x, w)),
        f"im2col conv, vmapped over {args.points}": (jax.jit(jax.vmap(conv_im2col)), (xs, ws)),
        "weight gradient, one": (jax.jit(wgrad), (x, w)),
        f"weight gradient, vmapped over {args.points}": (jax.jit(jax.vmap(wgrad)), (xs, ws)),
        "im2col weight gradient, one": (jax.jit(igrad), (x, w)),
        f"im2col weight gradient, vmapped over {args.points}": (jax.jit(jax.vmap(igrad)),
                                                                (xs, ws)),
        "10 gradient steps in lax.scan": (
            jax.jit(lambda w: jax.lax.scan(step, w, None, length=10)[0]), (w,)),
        "10 gradient steps, scan unrolled": (
            jax.jit(lambda w: jax.lax.scan(step, w, None, length=10, unroll=True)[0]), (w,)),
    }
    shapes = {"w1": (3, 3, 1, 16), "b1": (16,), "w2": (3, 3, 16, 32), "b2": (32,),
              "w3": (512, 64), "b3": (64,), "w4": (64, 10)}
    params = {k: jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for k, s in shapes.items()}
    many = jax.tree.map(lambda p: jnp.stack([p] * args.points), params)
    images = jnp.asarray(rng.normal(size=(64, 8, 8, 1)), jnp.float32)
    labels = jnp.zeros(64, jnp.int32)
    for name, fn in (("CNN train step", conv), ("im2col CNN train step", conv_im2col)):
        cases[f"{name}, one"] = (jax.jit(cnn_step(fn)), (params, images, labels))
        cases[f"{name}, vmapped over {args.points}"] = (
            jax.jit(jax.vmap(cnn_step(fn), in_axes=(0, None, None))), (many, images, labels))
    results = {}
    for name, (fn, fn_args) in cases.items():
        results[name] = median_ms(fn, fn_args, args.runs)
        print(json.dumps({"bench": "conv_vmap", "case": name, "ms": round(results[name], 3),
                          "device": jax.devices()[0].device_kind}), flush=True)
    print(f"\n{'case':44s} {'ms':>9s}")
    for name, ms in results.items():
        print(f"{name:44s} {ms:9.2f}")


if __name__ == "__main__":
    main()
