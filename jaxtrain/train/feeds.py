"""How batches reach the compiled step: from the host each call, or gathered on the devices.

Both give the batch of data position `p` as `batch_at(data, batch_size, seed, p)`, so the
data order is a pure function of (seed, position) and a resumed run sees the same batches.
`DeviceFeed` keeps a small data set on the devices with the order of the current and next
epoch and gathers each batch inside the compiled call from the state's `data_position`:
nothing is transferred per step. `HostFeed` puts each (prefetched) batch on the devices;
on many processes each reads and transfers only its own rows of every global batch
(`sharding.local_batch_rows`).
Each feed compiles one call per step count (one step, and `steps_per_call` steps): every
call returns its (last) step's metrics, which the loop reads only at log points. A second,
metric-free variant for the calls between log points cost a second compile at start-up
(about half of the char GPT's 10 s) and saved nothing measurable per step
(benchmarks/RESULTS.md, "One compiled call per step count").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import sharding
from ..data import epoch_order
from ..errors import JaxtrainError
from .step import make_multi_step, scan_keep_last

DEVICE_DATA_BYTES = 256 * 2**20  # "auto" keeps data sets up to this size on the devices


class Batches:
    """The batch of a data position: `batch_at(data, batch_size, seed, position)` for a
    dict of arrays (with the epoch's order cached), a user's `position -> batch`, or the
    Grain loader of prepared records (`jaxtrain.data.records.Records`), whose batches
    are this process's rows only (`local`)."""

    def __init__(self, data, batch_size: int | None, seed: int):
        self.data, self.local = None, False
        if hasattr(data, "loader"):
            self.fn, self.local = data.loader(batch_size, seed), True
            self.batch_size = batch_size
            return
        if callable(data):
            self.fn = data
            return
        if not isinstance(data, dict) or not data:
            raise JaxtrainError("train_data must be a dict of equal-length arrays or a "
                                f"function position -> batch, got {type(data).__name__}")
        sizes = {k: len(v) for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise JaxtrainError(f"train_data arrays differ in length: {sizes}")
        self.n = next(iter(sizes.values()))
        if not isinstance(batch_size, int) or not 0 < batch_size <= self.n:
            raise JaxtrainError(f"batch_size must be an integer in 1..{self.n} (the examples "
                                f"in train_data), got {batch_size!r}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.per_epoch = self.n // batch_size
        self.epoch, self.order = None, None
        self.fn = None

    def order_of(self, epoch: int) -> np.ndarray:
        """The example indices of an epoch's full batches, in order."""
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_order(self.n, self.seed, epoch)
        return self.order[:self.per_epoch * self.batch_size]

    def _batch_at(self, position: int, rows: slice) -> dict:
        epoch, index = divmod(position, self.per_epoch)
        idx = self.order_of(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return {k: v[idx[rows]] for k, v in self.data.items()}

    def share(self, position: int, rows: slice = slice(None)):
        """Rows `rows` of the global batch at `position` (a user's function gives the
        whole batch, which is then cut)."""
        if self.data is not None:
            return self._batch_at(position, rows)
        if self.local:  # the loader reads this process's rows itself
            return self.fn(position)
        return jax.tree.map(lambda x: x[rows], self.fn(position))

    def get(self, position: int, count: int, rows: slice = slice(None)):
        """Rows `rows` of one batch (`count == 1`) or of `count` consecutive batches
        stacked on a new leading axis."""
        if count == 1:
            return self.share(position, rows)
        if self.local and hasattr(self.fn, "many"):  # a records Loader: in one read
            return self.fn.many(position, count)
        many = [self.share(position + i, rows) for i in range(count)]
        return jax.tree.map(lambda *xs: np.stack(xs), *many)


def _stacked(mesh) -> NamedSharding:
    """Batches stacked on a new leading axis, each split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))


class HostFeed:
    """Each call's batch (or `count` stacked batches) put on the mesh by the host. Each
    process reads only its rows of every global batch (all rows on one process); a batch
    size the mesh cannot split is an error here, before anything compiles."""

    def __init__(self, batches: Batches, mesh, calls: dict):
        self.batches, self.mesh, self.calls = batches, mesh, calls
        self.flat, self.stacked = sharding.batch_sharding(mesh), _stacked(mesh)
        known = batches.data is not None or batches.local
        self.size = batches.batch_size if known else None
        self.rows = None if self.size is None else sharding.local_batch_rows(mesh, self.size)

    @staticmethod
    def compile(step_fn, mesh, state_shardings, steps_per_call: int) -> dict:
        """`{count: compiled call}` for `count` in (1, steps_per_call)."""
        calls = {1: sharding.compile_step(step_fn, mesh, state_shardings)}
        if steps_per_call > 1:
            multi = make_multi_step(step_fn, steps_per_call, metrics="last")
            calls[steps_per_call] = jax.jit(
                multi, in_shardings=(state_shardings, _stacked(mesh)),
                out_shardings=(state_shardings, sharding.replicated(mesh)),
                donate_argnums=(0,))
        return calls

    def fn(self, count: int):
        return self.calls[count]

    def args(self, position: int, count: int) -> tuple:
        if self.rows is None:  # a user's function: its first batch gives the global size
            self.size = sharding.global_batch_size(self.batches.fn(position), self.mesh)
            self.rows = sharding.local_batch_rows(self.mesh, self.size)
        share = self.batches.get(position, count, self.rows)
        if count > 1:
            return (sharding.from_shares(share, self.stacked, self.size, axis=1),)
        return (sharding.from_shares(share, self.flat, self.size),)


def fits_on_devices(batches: Batches, steps_per_call: int, device_data) -> bool:
    """Whether `DeviceFeed` applies: a dict data set, small enough (or `device_data=True`)."""
    if batches.data is None or device_data is False or steps_per_call > batches.per_epoch:
        return False
    size = sum(np.asarray(v).nbytes for v in batches.data.values())
    return device_data is True or size <= DEVICE_DATA_BYTES


class DeviceFeed:
    """The data set and two epochs' order on the devices (replicated); the compiled call
    gathers the batch of `state.data_position` itself."""

    def __init__(self, batches: Batches, mesh, step_fn, state_shardings, steps_per_call: int):
        rep = sharding.replicated(mesh)
        flat = sharding.batch_sharding(mesh)
        bs = batches.batch_size
        sharding.local_batch_rows(mesh, bs)  # a clear error if bs does not divide
        self.batches, self.rep = batches, rep
        self.data = jax.device_put({k: np.asarray(v) for k, v in batches.data.items()}, rep)
        self.epoch, self.order, self.base = None, None, None

        def gather(state, data, order, base):
            start = (state.data_position - base) * bs
            idx = jax.lax.dynamic_slice_in_dim(order, start, bs)
            batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
            return jax.lax.with_sharding_constraint(batch, flat)

        def single(step):
            def call(state, data, order, base):
                return step(state, gather(state, data, order, base))
            return call

        def multi(step):  # only the last step's metrics are logged
            def call(state, data, order, base):
                return scan_keep_last(lambda s, _: step(s, gather(s, data, order, base)),
                                      state, length=steps_per_call)
            return call

        def compile_(fn):
            return jax.jit(sharding.under_mesh(fn, mesh),
                           in_shardings=(state_shardings, rep, rep, rep),
                           out_shardings=(state_shardings, rep), donate_argnums=(0,))

        self.calls = {1: compile_(single(step_fn))}
        if steps_per_call > 1:
            self.calls[steps_per_call] = compile_(multi(step_fn))

    def fn(self, count: int):
        return self.calls[count]

    def args(self, position: int, count: int) -> tuple:
        epoch = position // self.batches.per_epoch
        if epoch != self.epoch:  # this epoch's order and the next (a call may cross over)
            order = np.concatenate([self.batches.order_of(epoch),
                                    self.batches.order_of(epoch + 1)]).astype(np.int32)
            self.order = jax.device_put(order, self.rep)
            self.base = jax.device_put(np.int32(epoch * self.batches.per_epoch), self.rep)
            self.epoch = epoch
        return self.data, self.order, self.base
