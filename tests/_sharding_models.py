"""Test subjects for the sharding tests: the digits CNN and a small GPT, a minimal train
state and step, deterministic batches, and `train(...)` that runs N steps on a placement.

Kept apart from `jaxtrain.train` so that these tests pin the sharding layer alone; the
multi-host worker imports it too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxtrain import sharding
from jaxtrain.models import CNN, GPT, logical_axes

GPT_CONFIG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=8, mlp_ratio=4,
                  max_len=16)
SEQ = 16


class State(struct.PyTreeNode):
    """What a train step needs: params, optimizer state, step; model and optimizer static."""

    step: jax.Array
    params: dict
    opt_state: object
    graphdef: object = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def build(kind: str, tx, seed: int = 0):
    """A fresh `State` and the logical axes of its params."""
    with nnx.use_eager_sharding(False):
        if kind == "cnn":
            model = CNN(num_classes=10, rngs=nnx.Rngs(seed))
        else:
            model = GPT(**GPT_CONFIG, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    axes = logical_axes(params)
    params = nnx.to_pure_dict(params)
    state = State(jnp.zeros((), jnp.int32), params, tx.init(params), graphdef, tx)
    return state, axes


def loss_fn(state, params, batch):
    model = nnx.merge(state.graphdef, params)
    if "tokens" in batch:
        logits = model(batch["tokens"][:, :-1])
        labels = batch["tokens"][:, 1:]
    else:
        logits, labels = model(batch["image"]), batch["label"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state, batch):
    """The user's pure step: the same code under every placement."""
    loss, grads = jax.value_and_grad(lambda p: loss_fn(state, p, batch))(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
    return new, {"loss": loss}


def batch_at(kind: str, step: int, size: int = 16) -> dict:
    """The global batch of `step` (numpy), the same on every process."""
    rng = np.random.default_rng(1000 + step)
    if kind == "cnn":
        return {"image": rng.normal(size=(size, 8, 8)).astype(np.float32),
                "label": rng.integers(0, 10, size).astype(np.int32)}
    return {"tokens": rng.integers(0, GPT_CONFIG["vocab_size"], (size, SEQ + 1)).astype(np.int32)}


def train(kind: str, placement: str, mesh_sizes: dict | None = None, steps: int = 10,
          tx=None, devices=None, size: int = 16):
    """Params (numpy) and losses after `steps` steps; `placement` is a preset name,
    'pmap', or 'pmap-sum'."""
    tx = tx or optax.adam(1e-3)
    state, axes = build(kind, tx)
    losses = []
    if placement.startswith("pmap"):
        step = sharding.pmap_step(train_step, devices=devices,
                                  reduce="sum" if placement == "pmap-sum" else "mean")
        mesh = step.mesh
        state = sharding.place(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))
    else:
        mesh = sharding.make_mesh(**(mesh_sizes or {}), devices=devices)
        shardings = sharding.state_shardings(state, mesh, placement, axes)
        state = sharding.place(state, shardings)
        step = sharding.compile_step(train_step, mesh, shardings)
    rows = sharding.local_batch_rows(mesh, size)
    for i in range(steps):
        local = jax.tree.map(lambda x: x[rows], batch_at(kind, i, size))
        state, metrics = step(state, sharding.shard_batch(local, mesh))
        losses.append(metrics["loss"])
    return state, [float(x) for x in jax.device_get(losses)], mesh
