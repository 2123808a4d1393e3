"""Logical axis names -> mesh axes, as rules tables and presets.

Model params carry logical names (`embed`, `mlp`, `heads`, ...) in their Flax NNX
partitioning metadata. A rules table maps each logical name to a mesh axis, a tuple of
mesh axes (split jointly), or None (replicated); names missing from the table are
replicated. Within one param a mesh axis is used at most once: a later dimension whose
rule names an axis already taken stays replicated (as in `flax.linen.logical_to_mesh_axes`).

Params without annotations fall back to: shard the largest dimension divisible by the
`fsdp` axis size over `fsdp` (ties: the first), else replicate.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import JaxtrainError
from ..transforms.blocks import Stacks, spread_axes
from ..transforms.paths import path_str
from .mesh import AXES

# Every preset puts a model's stacked `layers` on the pipeline stages (a no-op while the
# mesh's `pipe` has size 1); a rules table of one's own should map `layers` to `pipe` too.
PRESETS: dict[str, dict] = {
    # Replicate every annotated param; only the batch is split.
    "dp": {"layers": "pipe"},
    # ZeRO-3: params (and so gradients and optimizer state) split over `fsdp`, gathered
    # per layer when used. `embed` (or the channel/mlp dim where there is no `embed`).
    "fsdp": {"layers": "pipe", "embed": "fsdp", "mlp": "fsdp", "norm": "fsdp",
             "conv_out": "fsdp"},
    # Megatron: attention split by heads, MLP by hidden units. Column-parallel first
    # matmul (`embed, mlp` / `embed, heads, kv` split on the output), row-parallel second
    # (`mlp, embed` / `heads, kv, embed` split on the input): one all-reduce per block.
    # The embedding table is vocab-parallel (so the vocabulary size must divide).
    "tp": {"layers": "pipe", "mlp": "tensor", "heads": "tensor", "vocab": "tensor"},
    # Both: Megatron inside a layer over `tensor`, ZeRO-3 over `fsdp` on `embed`.
    "fsdp+tp": {"layers": "pipe", "embed": "fsdp", "norm": "fsdp", "mlp": "tensor",
                "heads": "tensor", "vocab": "tensor", "conv_out": "fsdp"},
}


def get_rules(preset: str | dict, mesh=None) -> dict:
    """A rules table by preset name, or the table itself, checked against the mesh axes
    (`mesh`'s, else the fixed `AXES`)."""
    if isinstance(preset, dict):
        valid = tuple(mesh.axis_names) if mesh is not None else AXES
        for name, axes in preset.items():
            for axis in _axes_of(axes):
                if axis not in valid:
                    raise JaxtrainError(
                        f"sharding rule {name!r} -> {axes!r}: no such mesh axis {axis!r} "
                        f"(valid: {', '.join(valid)})"
                    )
        return preset
    if preset not in PRESETS:
        raise JaxtrainError(
            f"unknown sharding preset {preset!r} (valid: {', '.join(sorted(PRESETS))})"
        )
    return PRESETS[preset]


def _axes_of(rule) -> tuple:
    """The mesh axes a rule value names: None -> (), 'a' -> ('a',), ('a', 'b') as is."""
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(logical_axes, rules: dict) -> PartitionSpec:
    """The mesh PartitionSpec of one param from its logical axis names (no shape checks)."""
    if not logical_axes:
        return PartitionSpec()
    used: set = set()
    entries = []
    for name in logical_axes:
        axes = _axes_of(rules.get(name)) if name else ()
        if not axes or used & set(axes):
            entries.append(None)
            continue
        used |= set(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def fallback_spec(shape, mesh) -> PartitionSpec:
    """The rule for unannotated params: the largest dimension divisible by the `fsdp`
    size goes on `fsdp` (first of equals); none divisible, or `fsdp` of size 1: replicate."""
    ways = dict(mesh.shape).get("fsdp", 1)
    if ways == 1 or not shape:
        return PartitionSpec()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % ways == 0]
    if not candidates:
        return PartitionSpec()
    dim = -max(candidates)[1]
    return PartitionSpec(*("fsdp" if i == dim else None for i in range(len(shape))))


def param_spec(path: str, shape, logical, mesh, rules: dict) -> PartitionSpec:
    """The checked PartitionSpec of the param at `path`: by `rules` from its logical names,
    or by `fallback_spec` when it has none."""
    shape = tuple(shape)
    if not logical:
        return fallback_spec(shape, mesh)
    if len(logical) != len(shape):
        raise JaxtrainError(
            f"param {path}: {len(logical)} logical axis names {tuple(logical)} for a "
            f"{len(shape)}-dimensional shape {shape}"
        )
    spec = logical_to_spec(logical, rules)
    sizes = dict(mesh.shape)
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
        axes = _axes_of(entry)
        missing = [a for a in axes if a not in sizes]
        if missing:
            raise JaxtrainError(
                f"param {path}: rule for {logical[dim]!r} names mesh axis {missing[0]!r}, "
                f"which the mesh {sizes} does not have"
            )
        ways = _ways(entry, sizes)
        if size % ways:
            raise JaxtrainError(
                f"param {path}: dimension {dim} ({logical[dim]!r}, size {size}) is not "
                f"divisible by mesh axis {'x'.join(axes)} of size {ways} (mesh {sizes})"
            )
    return spec


def param_specs(params, mesh, rules, logical_axes=None):
    """A tree like `params` of checked PartitionSpecs. `logical_axes`: a tree like
    `params` of logical-name tuples (empty or None: unannotated), or None for all."""
    rules = get_rules(rules, mesh)
    logical = _logical_by_path(logical_axes)
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: param_spec(path_str(kp), _shape(leaf), logical.get(path_str(kp)),
                                    mesh, rules),
        params,
    )


def tree_shardings(logical_tree, mesh, rules: dict):
    """NamedShardings for a tree whose leaves are tuples of logical names (or None),
    without shape checks (see `state_shardings` for the checked, whole-state version)."""
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
        logical_tree,
        is_leaf=lambda x: x is None or isinstance(x, tuple),
    )


def state_shardings(state, mesh, rules="dp", logical_axes=None, params=None):
    """NamedShardings for a whole train state (a TrainState or any pytree).

    Params (`params`, default `state.params` or `state["params"]`, else the whole tree)
    are placed by the rules. Every other leaf whose path ends with a param's path (the optimizer's
    `mu/<path>`, `nu/<path>`, EMA copies, ...) follows that param: same shape, same
    spec; the shape with one dimension removed (factored second moments such as
    Adafactor's `v_row` / `v_col`), the spec without that dimension. Per-block state kept
    stacked (`transforms.blocks.Stacks`: Shampoo's and SOAP's statistics and bases) is
    split on its leading (block) axis across the mesh axes whose sizes divide the stack
    (`blocks.spread_axes`, as the optimizer's update spreads it). Everything else
    (step counts, scalars, RNG keys, model statistics) is replicated.
    """
    if params is None:
        params = state.get("params", state) if isinstance(state, dict) else getattr(
            state, "params", state)
    specs = {
        path_str(kp): (tuple(_shape(leaf)), spec)
        for kp, leaf, spec in _zip_with_path(params, param_specs(params, mesh, rules,
                                                                 logical_axes))
    }

    def leaf_sharding(kp, leaf):
        if isinstance(leaf, Stacks):
            return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(
                spread_axes(dict(mesh.shape), _shape(x)[0]))), leaf)
        return NamedSharding(mesh, _follow(path_str(kp), tuple(_shape(leaf)), specs,
                                           dict(mesh.shape)))

    return jax.tree_util.tree_map_with_path(leaf_sharding, state,
                                            is_leaf=lambda x: isinstance(x, Stacks))


def _follow(path: str, shape: tuple, specs: dict, sizes: dict) -> PartitionSpec:
    """The spec of a state leaf from the param whose path is the longest suffix of its own;
    a leaf of one dimension more whose leading sizes each the param's shards divide (8-bit
    moments' per-piece scales, `transforms.compact_state.pieces_for`) follows it on those."""
    parts = path.split("/")
    for start in range(len(parts)):
        found = specs.get("/".join(parts[start:]))
        if found is None:
            continue
        pshape, spec = found
        entries = tuple(spec) + (None,) * (len(pshape) - len(spec))
        if shape == pshape:
            return spec
        for dim in range(len(pshape)):
            if pshape[:dim] + pshape[dim + 1:] == shape:
                return PartitionSpec(*(entries[:dim] + entries[dim + 1:]))
        if len(shape) == len(pshape) + 1 and all(
                n % _ways(e, sizes) == 0 for n, e in zip(shape, entries, strict=False)):
            return PartitionSpec(*entries, None)
        return PartitionSpec()
    return PartitionSpec()


def _ways(entry, sizes: dict) -> int:
    """Devices a spec entry splits a dimension over."""
    return math.prod(sizes[a] for a in _axes_of(entry))


def replicated(mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def _shape(leaf) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


def _zip_with_path(tree, specs):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return [(kp, leaf, spec) for (kp, leaf), spec in zip(leaves, spec_leaves, strict=True)]


def _logical_by_path(logical_axes) -> dict:
    if logical_axes is None:
        return {}
    flat = jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=lambda x: x is None or isinstance(x, (tuple, PartitionSpec))
    )[0]
    return {path_str(kp): tuple(v) if v is not None else None for kp, v in flat}
