"""Put state and batches on a mesh, on one host or many."""

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
    """Place a host batch (a pytree of arrays with a common leading dim) across the mesh.

    On one process `batch` is the global batch. On many, each process passes only its
    own slice (`local_batch_rows` says which rows of the global batch that is), and the
    result is the global array of all the slices in process order
    (`jax.make_array_from_process_local_data`); no process ever holds the whole batch.
    """
    ways = batch_parallelism(mesh)
    procs = jax.process_count()
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        size = np.shape(leaf)[0] if np.ndim(leaf) else None
        if size is None or (size * procs) % ways:
            name = jax.tree_util.keystr(path) or "batch"
            glob = "" if procs == 1 else f" (x {procs} processes = {(size or 0) * procs})"
            raise JaxtrainError(
                f"batch {name} has leading size {size}{glob}, not divisible by the "
                f"{ways}-way data parallelism of the mesh {dict(mesh.shape)}"
            )
    sharding = batch_sharding(mesh)
    if procs == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def local_batch_rows(mesh, global_size: int) -> slice:
    """The rows of a global batch of `global_size` that this process feeds (its devices'
    rows; everything on one process). Data readers use it to read only their share."""
    ways = batch_parallelism(mesh)
    if not isinstance(global_size, int) or global_size < 1 or global_size % ways:
        procs = jax.process_count()
        over = "" if procs == 1 else f" over {procs} processes"
        raise JaxtrainError(
            f"global batch size {global_size!r} is not divisible by the {ways}-way data "
            f"parallelism (data x fsdp) of the mesh {dict(mesh.shape)}{over}")
    sharding = batch_sharding(mesh)
    rows = sorted({
        (index[0].start or 0, global_size if index[0].stop is None else index[0].stop)
        for index in sharding.addressable_devices_indices_map((global_size,)).values()
    })
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:
        raise JaxtrainError(
            f"process {jax.process_index()} holds non-contiguous batch rows {rows} on mesh "
            f"{dict(mesh.shape)}: order the mesh so each process's devices are adjacent"
        )
    return slice(start, stop)


def from_shares(share, sharding, global_size: int, axis: int = 0):
    """The global array of a batch of which this process holds its `local_batch_rows`
    (along `axis`; on one process the whole batch): no process holds the whole batch."""
    if jax.process_count() == 1:
        return jax.device_put(share, sharding)

    def one(x):
        x = np.asarray(x)
        shape = (*x.shape[:axis], global_size, *x.shape[axis + 1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, share)


def shard_global_batch(batch, mesh):
    """Place a global batch that every process holds whole (evaluation data, a user's
    `position -> batch`): each process puts only its own rows on its devices."""
    size = global_batch_size(batch, mesh)
    rows = local_batch_rows(mesh, size)
    share = batch if jax.process_count() == 1 else jax.tree.map(lambda x: x[rows], batch)
    return from_shares(share, batch_sharding(mesh), size)


def global_batch_size(batch, mesh) -> int:
    """The common leading size of a batch's arrays (a one-line error names the first that
    differs or is not divisible by the mesh's data parallelism)."""
    ways, sizes = batch_parallelism(mesh), set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        size = np.shape(leaf)[0] if np.ndim(leaf) else None
        sizes.add(size)
        if size is None or size % ways or len(sizes) > 1:
            name = jax.tree_util.keystr(path) or "batch"
            raise JaxtrainError(
                f"batch {name} has leading size {size}, not divisible by the {ways}-way "
                f"data parallelism of the mesh {dict(mesh.shape)}"
                + (" (or unlike the other arrays' sizes)" if len(sizes) > 1 else ""))
    return sizes.pop()


def place(tree, shardings):
    """Put `tree` on the devices with the matching tree of `shardings` (on many processes,
    every process passes the same full values; each keeps only its own shards)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s,
                                                  lambda idx, x=x: np.asarray(x)[idx]),
        tree, shardings,
    )
