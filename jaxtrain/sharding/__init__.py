"""Where a step runs: meshes, partition rules, placement, compilation, many hosts."""

from .compile import InFlight, compile_eval, compile_step
from .distributed import initialize
from .mesh import AXES, BATCH_AXES, batch_parallelism, make_mesh
from .place import batch_sharding, local_batch_rows, place, shard_batch
from .pmap import pmap_step
from .rules import (
    PRESETS,
    fallback_spec,
    get_rules,
    logical_to_spec,
    param_specs,
    replicated,
    state_shardings,
    tree_shardings,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "InFlight",
    "PRESETS",
    "batch_parallelism",
    "batch_sharding",
    "compile_eval",
    "compile_step",
    "fallback_spec",
    "get_rules",
    "initialize",
    "local_batch_rows",
    "logical_to_spec",
    "make_mesh",
    "param_specs",
    "place",
    "pmap_step",
    "replicated",
    "shard_batch",
    "state_shardings",
    "tree_shardings",
]
