"""Initialisers that attach logical axis names to params (Flax NNX partitioning metadata)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def kernel_init(axes: tuple, init=None):
    """LeCun-normal (or `init`) with logical axis names `axes`."""
    return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), axes)


def zeros_init(axes: tuple):
    """Zeros with logical axis names `axes`."""
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def logical_axes(params: nnx.State) -> dict:
    """Pure-dict tree of logical-axis tuples (empty tuple: no annotation) for `params`."""
    import jax

    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def ones_init(axes: tuple):
    """Ones with logical axis names `axes` (norm scales)."""
    return nnx.with_partitioning(nnx.initializers.ones_init(), axes)


def param_count(model: nnx.Module) -> int:
    """Number of trainable scalars (`nnx.Param` leaves) in `model`."""
    import jax

    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_dtype(model: nnx.Module):
    """The dtype of the model's first floating param: what a precision policy cast the
    params to, and so the dtype inputs should enter the network in."""
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32
