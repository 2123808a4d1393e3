"""The pmap path: replicated data parallelism, built on `jax.shard_map`.

In this JAX, `jax.pmap` is itself implemented on `shard_map`; we use `jax.shard_map`
directly. Each device runs the user's unchanged step on its slice of the batch with a
replicated state. Under `shard_map`'s type checking (`check_vma=True`) the gradient of
the replicated params is summed over devices automatically (the transpose of the
implicit broadcast is a `psum`). `reduce="mean"` (the default) turns that sum into a mean
by scaling the gradients entering the state's optimizer (`state.tx`) by 1/devices, which
gives the one-device result on the global batch; `reduce="sum"` keeps the sum. Values the
step leaves device-dependent (metrics, batch statistics) are averaged over devices.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec

from ..errors import JaxtrainError
from .mesh import BATCH_AXES, make_mesh

REDUCTIONS = ("mean", "sum")


def pmap_step(step_fn, devices=None, reduce: str = "mean", donate: bool = True):
    """`(state, batch) -> (state, metrics)` run data-parallel over `devices` (default: all)
    with a replicated state. Put the state with `place(state, replicated(step.mesh))` and
    batches with `shard_batch(batch, step.mesh)`."""
    if reduce not in REDUCTIONS:
        raise JaxtrainError(f"pmap_step reduce={reduce!r} (valid: {', '.join(REDUCTIONS)})")
    return _PmapStep(step_fn, make_mesh(data=-1, devices=devices), reduce, donate)


class _PmapStep:
    def __init__(self, step_fn, mesh, reduce, donate):
        self.mesh, self.reduce = mesh, reduce
        mapped = jax.shard_map(
            self._body(step_fn), mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(BATCH_AXES)),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=True,
        )
        self._jitted = jax.jit(mapped, donate_argnums=(0,) if donate else ())

    def _body(self, step_fn):
        n = self.mesh.size

        def body(state, batch):
            inner = state
            if self.reduce == "mean":
                tx = getattr(state, "tx", None)
                if tx is None or not hasattr(state, "replace"):
                    raise JaxtrainError(
                        "pmap_step(reduce='mean') scales the summed gradients through the "
                        f"state's optimizer `tx`, and a {type(state).__name__} has none; "
                        "use a TrainState or reduce='sum'"
                    )
                inner = state.replace(tx=_scaled(tx, 1.0 / n))
            new_state, metrics = step_fn(inner, batch)
            if self.reduce == "mean":
                new_state = new_state.replace(tx=state.tx)
            return _device_mean(new_state), _device_mean(metrics)

        return body

    def __call__(self, state, batch):
        return self._jitted(state, batch)

    def lower(self, state, batch):
        return self._jitted.lower(state, batch)


def _scaled(tx, scale: float) -> optax.GradientTransformationExtraArgs:
    """`tx` with its incoming gradients multiplied by `scale` (same state, same init)."""

    def update(updates, state, params=None, **extra):
        updates = jax.tree.map(lambda g: g * scale, updates)
        if extra:
            return tx.update(updates, state, params, **extra)
        return tx.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _device_mean(tree):
    """Average the leaves that differ between devices; leave replicated ones alone."""

    def one(kp, x):
        varying = tuple(sorted(jax.typeof(x).manual_axis_type.varying))
        if not varying:
            return x
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
            raise JaxtrainError(
                f"pmap_step: {jax.tree_util.keystr(kp)} ({x.dtype}) differs between devices "
                "and cannot be averaged"
            )
        return jax.lax.pmean(x, varying)

    return jax.tree_util.tree_map_with_path(one, tree)
