"""Pure gradient transformations in the Optax protocol: optimizers, schedules, wrappers."""

from .hyperparams import current_hyperparams
from .optimizers import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    amsgrad,
    ema_momentum,
    lamb,
    lars,
    lion,
    muon,
    nadam,
    nadamw,
    normalized_sgd,
    radam,
    rmsprop,
    schedule_free_adamw,
    schedule_free_eval_params,
    sgd,
)
from .paths import matches, path_list, path_mask, path_str, tree_paths
from .privacy import dp_aggregate, dp_sgd
from .pruning import magnitude_prune, polynomial_sparsity, sparsity_report
from .second_order import lbfgs, newton, newton_cg
from .wrappers import freeze, per_group

__all__ = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adamax",
    "amsgrad",
    "ema_momentum",
    "lamb",
    "lars",
    "lbfgs",
    "lion",
    "muon",
    "nadam",
    "nadamw",
    "newton",
    "newton_cg",
    "normalized_sgd",
    "radam",
    "rmsprop",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "adam",
    "adamw",
    "current_hyperparams",
    "dp_aggregate",
    "dp_sgd",
    "freeze",
    "magnitude_prune",
    "matches",
    "path_list",
    "path_mask",
    "path_str",
    "per_group",
    "polynomial_sparsity",
    "sgd",
    "sparsity_report",
    "tree_paths",
]
