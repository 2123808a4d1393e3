"""Pure gradient transformations in the Optax protocol: optimizers, schedules, wrappers."""

from .hyperparams import current_hyperparams
from .optimizers import adam, adamw, sgd
from .paths import matches, path_list, path_mask, path_str, tree_paths
from .wrappers import freeze, per_group

__all__ = [
    "adam",
    "adamw",
    "current_hyperparams",
    "freeze",
    "matches",
    "path_list",
    "path_mask",
    "path_str",
    "per_group",
    "sgd",
    "tree_paths",
]
