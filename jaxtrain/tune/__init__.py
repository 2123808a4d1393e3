"""Answer "which optimizer, which learning rate, which batch size?" by measurement."""

from .batch_size import BatchSizeResult, find_batch_size
from .compare import STRATEGIES, Comparison, compare
from .lr_find import LRFindResult, lr_find
from .runs import RunSpec
from .setup import Problem, problem_from_config
from .sweep import SweepResult, expand_grid, sweep

__all__ = [
    "STRATEGIES",
    "BatchSizeResult",
    "Comparison",
    "LRFindResult",
    "Problem",
    "RunSpec",
    "SweepResult",
    "compare",
    "expand_grid",
    "find_batch_size",
    "lr_find",
    "problem_from_config",
    "sweep",
]
