"""Communication-light data parallelism: local SGD and DiLoCo (Douillard et al. 2023).

Each of the R replicas on the mesh's `data` axis keeps its own params and inner
optimizer state and takes `H` inner steps on its own slice of the batches without any
communication. Then one synchronisation:

    outer_grad = global_params - mean_r(local_params_r)      (one all-reduce)
    global_params <- outer_tx step on outer_grad
    local_params_r <- global_params                          (inner states are kept)

With `outer_tx = sgd(1.0)` this is local SGD / model averaging; DiLoCo uses Nesterov
SGD (learning rate 0.7, momentum 0.9) outside and AdamW inside. Plain data parallelism
all-reduces the gradients every step; this all-reduces the param deltas every H steps.
The replicas run under `jax.shard_map` over `data`, so the inner steps provably hold no
collective (see `all_reduce_stats`). Model state (BatchNorm statistics) is not trained.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import JaxtrainError

P = PartitionSpec


class LocalSGDState(struct.PyTreeNode):
    step: jax.Array  # inner steps taken
    params: Any  # global params (replicated)
    outer_opt_state: Any
    local_params: Any  # leading axis: replica
    inner_opt_state: Any  # leading axis: replica
    rng: jax.Array
    model_state: Any
    adapter: Any = struct.field(pytree_node=False)
    inner_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    outer_tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, train_state, outer_tx, replicas: int) -> LocalSGDState:
        """From a TrainState (its `tx` becomes the inner optimizer) and `replicas` copies."""
        stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * replicas), tree)
        return cls(
            step=jnp.zeros((), jnp.int32), params=train_state.params,
            outer_opt_state=outer_tx.init(train_state.params),
            local_params=stack(train_state.params),
            inner_opt_state=stack(train_state.tx.init(train_state.params)),
            rng=train_state.rng, model_state=train_state.model_state,
            adapter=train_state.adapter, inner_tx=train_state.tx, outer_tx=outer_tx,
        )

    def saveable(self) -> dict:
        """The arrays of the state as a plain dict (what checkpoints hold)."""
        return {"step": self.step, "params": self.params,
                "outer_opt_state": self.outer_opt_state, "local_params": self.local_params,
                "inner_opt_state": self.inner_opt_state, "rng": self.rng,
                "model_state": self.model_state}

    def with_saved(self, saved: dict) -> LocalSGDState:
        """This state with its arrays replaced by a `saveable()` dict."""
        return self.replace(**saved)

    def model(self, params=None):
        return self.adapter.bind(self.params if params is None else params,
                                 self.model_state, False)


def _specs(state: LocalSGDState):
    """Per leaf: replicated for global parts, split on `data` for per-replica parts."""
    rep = lambda tree: jax.tree.map(lambda _: P(), tree)
    split = lambda tree: jax.tree.map(lambda _: P("data"), tree)
    return state.replace(step=P(), params=rep(state.params),
                         outer_opt_state=rep(state.outer_opt_state),
                         local_params=split(state.local_params),
                         inner_opt_state=split(state.inner_opt_state), rng=P(),
                         model_state=rep(state.model_state))


def state_shardings(state: LocalSGDState, mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), _specs(state),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_local_sgd_round(loss_fn, mesh, sync_every: int):
    """A jitted `(state, batches) -> (state, losses)`: `sync_every` inner steps on every
    replica, then one outer step. `batches` leaves: `(sync_every, global_batch, ...)`,
    the global batch split over `data`; `losses`: `(replicas, sync_every)`."""
    if not (isinstance(sync_every, int) and sync_every >= 1):
        raise JaxtrainError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    others = {a: n for a, n in mesh.shape.items() if a != "data" and n != 1}
    if others:
        raise JaxtrainError(f"local SGD runs over the mesh's data axis only; this mesh also "
                            f"has {others} (make_mesh(data=-1))")

    def body(state: LocalSGDState, batches):
        replica = jax.lax.axis_index("data")
        squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
        rng = jax.random.fold_in(state.rng, replica)

        def inner_step(carry, inputs):
            params, opt_state = carry
            batch, t = inputs
            key = jax.random.fold_in(rng, state.step + t)

            def objective(p):
                return loss_fn(state.adapter.bind(p, state.model_state, True), batch, key)[0]

            loss, grads = jax.value_and_grad(objective)(params)
            updates, opt_state = state.inner_tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (local, inner_state), losses = jax.lax.scan(
            inner_step, (squeeze(state.local_params), squeeze(state.inner_opt_state)),
            (batches, jnp.arange(sync_every)))
        outer_grad = jax.lax.pmean(jax.tree.map(jnp.subtract, state.params, local), "data")
        updates, outer_state = state.outer_tx.update(outer_grad, state.outer_opt_state,
                                                     state.params)
        params = optax.apply_updates(state.params, updates)
        expand = lambda tree: jax.tree.map(lambda x: x[None], tree)
        new = state.replace(step=state.step + sync_every, params=params,
                            outer_opt_state=outer_state,
                            local_params=expand(jax.lax.pcast(params, "data", to="varying")),
                            inner_opt_state=expand(inner_state))
        return new, losses[None]

    def run(state, batches):
        specs = _specs(state)
        batch_specs = jax.tree.map(lambda _: P(None, "data"), batches)
        return jax.shard_map(body, mesh=mesh, in_specs=(specs, batch_specs),
                             out_specs=(specs, P("data")))(state, batches)

    return jax.jit(run, donate_argnums=(0,))


_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}


def all_reduce_stats(compiled_text: str) -> tuple[int, int]:
    """`(ops, bytes)` of the all-reduces in compiled HLO text
    (`jit(f).lower(...).compile().as_text()`); an op in a loop body counts once."""
    ops = nbytes = 0
    for line in compiled_text.splitlines():
        found = re.match(r"\s*(?:ROOT\s+)?%?\S+\s*=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if found:
            ops += 1
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", found.group(1)):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                nbytes += size * _BYTES.get(dtype, 4)
    return ops, nbytes
