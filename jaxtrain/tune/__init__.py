"""Answer "which optimizer, which learning rate, which batch size?" by measurement."""

from .batch_size import BatchSizeResult, find_batch_size
from .compare import STRATEGIES, Comparison, compare
from .crossval import CrossValidation, cross_validate, fold_sets
from .lr_find import LRFindResult, lr_find
from .runs import RunSpec
from .setup import Problem, problem_from_config
from .sweep import SweepResult, expand_grid, sweep

__all__ = [
    "STRATEGIES",
    "BatchSizeResult",
    "Comparison",
    "CrossValidation",
    "LRFindResult",
    "Problem",
    "RunSpec",
    "SweepResult",
    "compare",
    "cross_validate",
    "expand_grid",
    "find_batch_size",
    "fold_sets",
    "lr_find",
    "problem_from_config",
    "sweep",
]
