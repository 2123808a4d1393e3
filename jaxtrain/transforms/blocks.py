"""Blocks of many leaves stacked by shape, and spread over the devices of the mesh in use.

Muon orthogonalizes whole matrices; Shampoo and SOAP precondition blocks. Each matrix or
block is worked on alone, so on a sharded model no device needs all of them: the blocks
of every leaf are stacked, one array per block shape (`Stacks`), and each stack's
leading axis is split across the devices (`spread`). A device then holds whole blocks
(the partitioner moves the leaves' shards there with all-to-alls, ~1x the params in all),
does the work for its own blocks, and the results go back to the leaves' layout. Without
a mesh, or on one device, the stacks are the same batched computation on one device.

`spread` reads the mesh from the context, as the model's activations do: the axes of
`jax.sharding.get_abstract_mesh()` the partitioner places (`AxisType.Auto`;
`sharding.compile_step` traces under its mesh; a hand-written `jax.jit` needs
`with jax.set_mesh(mesh):`). Stacks kept in an optimizer state are padded at `init` to a
multiple of the optimizer's `num_devices` option (zero blocks, never read back), so that
they split evenly; `jaxtrain.sharding.state_shardings` splits them the same way
(`spread_axes`).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec


def spread_axes(axis_sizes: dict, count: int) -> tuple:
    """The mesh axes a stack of `count` blocks is split over: in mesh order, each axis of
    size > 1 whose size keeps the product a divisor of `count` (all of them when `count`
    is a multiple of the device count)."""
    axes, ways = [], 1
    for name, size in axis_sizes.items():
        if size > 1 and count % (ways * size) == 0:
            axes.append(name)
            ways *= size
    return tuple(axes)


def _mesh_axes() -> dict:
    """{axis: size} of the context mesh's partitioner-placed axes ({} without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}
    return {name: size for name, size, kind in
            zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True)
            if kind == AxisType.Auto}


def device_count() -> int:
    """How many devices `spread` splits over: the product of the context mesh's axes."""
    return math.prod(_mesh_axes().values())


def spread(x):
    """`x` with its leading (block) axis split across the context mesh (`spread_axes`);
    `x` itself without a mesh."""
    axes = spread_axes(_mesh_axes(), x.shape[0])
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def per_block(fn):
    """`fn` of one block mapped over stacks of blocks, for the linear algebra (eigh, QR):
    `jax.vmap` (one batched call), except on XLA:CPU. There a batched eigh splits its
    batch over the thread pool and blocks a pool thread until the pieces are done; two at
    once (two stacks, or several simulated devices) left no thread to run the pieces, and
    the step hung with every thread idle (jaxlib 0.10.2, `ParallelBatchMap`). So on CPU
    each device runs its own blocks one after another (a `lax.map` inside a `vmap` over
    the devices, so the loop never walks the split axis, which would gather it), and an
    outer `vmap` (a sweep's runs) becomes a loop as well: no eigh is ever batched."""
    if jax.default_backend() != "cpu":
        return jax.vmap(fn)

    @jax.custom_batching.custom_vmap
    def mapped(*stacks):
        n = jax.tree.leaves(stacks)[0].shape[0]
        axes = spread_axes(_mesh_axes(), n)
        ways = math.prod(_mesh_axes()[a] for a in axes)
        split = jax.tree.map(lambda x: x.reshape((ways, n // ways) + x.shape[1:]), stacks)
        if axes:
            split = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x, PartitionSpec(axes)), split)
        out = jax.vmap(lambda *xs: jax.lax.map(lambda a: fn(*a), xs))(*split)
        return jax.tree.map(lambda x: spread(x.reshape((n,) + x.shape[2:])), out)

    @mapped.def_vmap
    def _one_run_at_a_time(axis_size, in_batched, *stacks):
        stacks = jax.tree.map(
            lambda x, batched: x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)),
            stacks, tuple(in_batched))
        out = jax.lax.map(lambda xs: mapped(*xs), stacks)
        return out, jax.tree.map(lambda _: True, out)

    return mapped


@jax.tree_util.register_pytree_with_keys_class
class Stacks:
    """Optimizer state kept per block: `{block shape 'AxB': array (blocks, ...)}`. Its own
    type so that the sharding layer knows to split the leading axis across devices."""

    def __init__(self, arrays: dict):
        self.arrays = dict(arrays)

    def tree_flatten_with_keys(self):
        keys = sorted(self.arrays)
        return [(jax.tree_util.DictKey(k), self.arrays[k]) for k in keys], tuple(keys)

    @classmethod
    def tree_unflatten(cls, keys, children):
        return cls(dict(zip(keys, children, strict=True)))

    def __eq__(self, other):  # as a dict compares (trees of dtypes or shapes, in tests)
        return type(other) is Stacks and self.arrays == other.arrays

    def __repr__(self):
        return f"Stacks({self.arrays!r})"


def key(shape) -> str:
    """The name of a block shape: (32, 128) -> '32x128'."""
    return "x".join(str(d) for d in shape) or "scalar"


class Grid(NamedTuple):
    """A leaf reshaped to `shape` and cut along each axis into blocks of `block` (a last,
    smaller block where the size does not divide): the blocks are taken region by region
    (full blocks / remainder along each axis), each region by reshape and transpose."""

    shape: tuple  # the leaf's shape
    merged: tuple  # the shape it is cut in (its dims merged, same size)
    block: int

    def _parts(self, d):
        """[(start, size, block size)] along one axis of size d."""
        b = min(d, self.block)
        full, rest = divmod(d, b)
        return [(0, full * b, b)] + ([(full * b, rest, rest)] if rest else [])

    def regions(self):
        return list(itertools.product(*(self._parts(d) for d in self.merged)))

    def pieces(self, x):
        """The blocks of `x`, one (count, *block) array per region."""
        x = x.reshape(self.merged)
        out = []
        for region in self.regions():
            r = x[tuple(slice(s, s + n) for s, n, _ in region)]
            grid = [v for _, n, b in region for v in (n // b, b)]
            k = len(region)
            r = r.reshape(grid).transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
            out.append(r.reshape((-1,) + tuple(b for _, _, b in region)))
        return out

    def block_shapes(self):
        return [tuple(b for _, _, b in region) for region in self.regions()]

    def counts(self):
        return [math.prod(n // b for _, n, b in region) for region in self.regions()]

    def join(self, pieces):
        """The leaf from its blocks (the inverse of `pieces`)."""
        k = len(self.merged)
        parts = {}
        for region, p in zip(self.regions(), pieces, strict=True):
            grid = [n // b for _, n, b in region] + [b for _, _, b in region]
            p = p.reshape(grid).transpose([i for j in range(k) for i in (j, j + k)])
            parts[tuple(s for s, _, _ in region)] = p.reshape([n for _, n, _ in region])
        starts = [sorted({s for s, _, _ in self._parts(d)}) for d in self.merged]

        def nest(prefix, axis):
            if axis == k:
                return parts[prefix]
            return [nest(prefix + (s,), axis + 1) for s in starts[axis]]

        return jnp.block(nest((), 0)).reshape(self.shape)


class Plan:
    """Where each leaf's blocks go in the stacks, from shapes alone.

    `cuts`: per leaf, an object with `pieces(x)`, `join(pieces)`, `block_shapes()` and
    `counts()` (a `Grid`, or Muon's matrix view), or None for a leaf kept out. Each stack
    is padded with zero blocks to a multiple of `multiple`."""

    def __init__(self, cuts, multiple: int = 1):
        self.cuts = list(cuts)
        self.sizes: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self.places = []  # per leaf: [(stack key, offset, count)] or None
        for cut in self.cuts:
            if cut is None:
                self.places.append(None)
                continue
            places = []
            for shape, n in zip(cut.block_shapes(), cut.counts(), strict=True):
                k = key(shape)
                self.shapes[k] = shape
                places.append((k, self.sizes.get(k, 0), n))
                self.sizes[k] = self.sizes.get(k, 0) + n
            self.places.append(places)
        self.sizes = {k: -(-n // multiple) * multiple for k, n in self.sizes.items()}

    def full(self, fill, per_block=lambda shape: ()):
        """A `Stacks` of `fill(shape)` arrays of shape (blocks, *per_block(block shape))."""
        return Stacks({k: jnp.broadcast_to(fill(self.shapes[k]),
                                           (n,) + per_block(self.shapes[k])).copy()
                       for k, n in self.sizes.items()})

    def stack(self, leaves) -> dict:
        """{stack key: the blocks of `leaves` (zero-padded), spread over the devices}."""
        parts = {k: [] for k in self.sizes}
        for cut, x in zip(self.cuts, leaves, strict=True):
            if cut is not None:
                for p, shape in zip(cut.pieces(x), cut.block_shapes(), strict=True):
                    parts[key(shape)].append(p)
        out = {}
        for k, ps in parts.items():
            n = sum(p.shape[0] for p in ps)
            if self.sizes[k] > n:
                ps = ps + [jnp.zeros((self.sizes[k] - n,) + ps[0].shape[1:], ps[0].dtype)]
            out[k] = spread(jnp.concatenate(ps) if len(ps) > 1 else ps[0])
        return out

    def unstack(self, stacks: dict) -> list:
        """Per leaf, the leaf put back together from `stacks` (None for a leaf kept out)."""
        out = []
        for cut, places in zip(self.cuts, self.places, strict=True):
            if cut is None:
                out.append(None)
                continue
            out.append(cut.join([jax.lax.slice_in_dim(stacks[k], o, o + n)
                                 for k, o, n in places]))
        return out
