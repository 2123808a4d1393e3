"""Logical axis names -> mesh axes, as rules tables and presets.

Model params carry logical names (`embed`, `mlp`, `heads`, ...) in their Flax NNX
partitioning metadata. A rules table maps each logical name to a mesh axis (or None:
replicated). Names missing from the table are replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import JaxtrainError
from .mesh import AXES

PRESETS: dict[str, dict[str, str | None]] = {
    # Replicate every param; only the batch is split.
    "dp": {},
}


def get_rules(preset: str | dict) -> dict:
    """A rules table by preset name, or the table itself."""
    if isinstance(preset, dict):
        bad = {k: v for k, v in preset.items() if v is not None and v not in AXES}
        if bad:
            name, axis = next(iter(bad.items()))
            raise JaxtrainError(
                f"sharding rule {name!r} -> {axis!r}: no such mesh axis (valid: {', '.join(AXES)})"
            )
        return preset
    if preset not in PRESETS:
        raise JaxtrainError(
            f"unknown sharding preset {preset!r} (valid: {', '.join(sorted(PRESETS))})"
        )
    return PRESETS[preset]


def logical_to_spec(logical_axes, rules: dict) -> PartitionSpec:
    """The mesh PartitionSpec of one param from its logical axis names."""
    if logical_axes is None:
        return PartitionSpec()
    return PartitionSpec(*(rules.get(name) if name else None for name in logical_axes))


def tree_shardings(logical_tree, mesh, rules: dict):
    """NamedShardings for a tree whose leaves are tuples of logical names (or None)."""
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
        logical_tree,
        is_leaf=lambda x: x is None or isinstance(x, tuple),
    )


def replicated(mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())
