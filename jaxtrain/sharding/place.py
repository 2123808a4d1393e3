"""Put state and batches on a mesh."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import JaxtrainError
from .mesh import BATCH_AXES, batch_parallelism


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch, mesh):
    """Place a host batch (a pytree of arrays with a common leading dim) across the mesh."""
    ways = batch_parallelism(mesh)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        size = np.shape(leaf)[0] if np.ndim(leaf) else None
        if size is None or size % ways:
            name = jax.tree_util.keystr(path) or "batch"
            raise JaxtrainError(
                f"batch {name} has leading size {size}, not divisible by the "
                f"{ways}-way data parallelism of the mesh {dict(mesh.shape)}"
            )
    return jax.device_put(batch, batch_sharding(mesh))


def place(tree, shardings):
    """Put `tree` on the devices with the matching tree of `shardings`."""
    return jax.device_put(tree, shardings)
