"""Where a step runs: meshes, partition rules, placement, compilation, many hosts."""

from . import pipeline
from .compile import InFlight, compile_eval, compile_step, under_mesh, use_compilation_cache
from .config import PipelineConfig, ShardingConfig
from .distributed import (
    Launch,
    check_started,
    describe,
    detect_launch,
    initialize,
    is_main_process,
    start_from_env,
)
from .mesh import AXES, BATCH_AXES, batch_parallelism, make_mesh
from .place import (
    batch_sharding,
    from_shares,
    global_batch_size,
    local_batch_rows,
    place,
    shard_batch,
    shard_global_batch,
)
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
    "PipelineConfig",
    "ShardingConfig",
    "AXES",
    "BATCH_AXES",
    "InFlight",
    "Launch",
    "PRESETS",
    "batch_parallelism",
    "batch_sharding",
    "check_started",
    "compile_eval",
    "compile_step",
    "describe",
    "detect_launch",
    "fallback_spec",
    "from_shares",
    "get_rules",
    "global_batch_size",
    "initialize",
    "is_main_process",
    "local_batch_rows",
    "logical_to_spec",
    "make_mesh",
    "param_specs",
    "pipeline",
    "place",
    "pmap_step",
    "replicated",
    "shard_batch",
    "shard_global_batch",
    "start_from_env",
    "state_shardings",
    "tree_shardings",
    "under_mesh",
    "use_compilation_cache",
]
