"""Where a step runs: meshes, partition rules, placement and compilation."""

from .compile import compile_eval, compile_step
from .mesh import AXES, BATCH_AXES, batch_parallelism, make_mesh
from .place import batch_sharding, place, shard_batch
from .rules import PRESETS, get_rules, logical_to_spec, replicated, tree_shardings

__all__ = [
    "AXES",
    "BATCH_AXES",
    "PRESETS",
    "batch_parallelism",
    "batch_sharding",
    "compile_eval",
    "compile_step",
    "get_rules",
    "logical_to_spec",
    "make_mesh",
    "place",
    "replicated",
    "shard_batch",
    "tree_shardings",
]
