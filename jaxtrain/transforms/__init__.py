"""Pure gradient transformations in the Optax protocol: optimizers, schedules, wrappers."""

from . import masks, schedules
from .decay import add_decoupled_weight_decay, add_l1, add_l2
from .hyperparams import current_hyperparams
from .loss_scale import dynamic_loss_scale, loss_scale_value
from .low_precision import (
    fp32_master,
    low_precision_state,
    stochastic_round_bf16,
    stochastic_rounding,
)
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
from .plateau import reduce_on_plateau
from .privacy import dp_aggregate, dp_sgd
from .pruning import magnitude_prune, polynomial_sparsity, sparsity_report
from .second_order import lbfgs, newton, newton_cg
from .wrappers import freeze, per_group

__all__ = [
    "add_decoupled_weight_decay",
    "add_l1",
    "add_l2",
    "masks",
    "schedules",
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
    "reduce_on_plateau",
    "rmsprop",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "adam",
    "adamw",
    "current_hyperparams",
    "dp_aggregate",
    "dp_sgd",
    "freeze",
    "stochastic_rounding",
    "stochastic_round_bf16",
    "low_precision_state",
    "fp32_master",
    "loss_scale_value",
    "dynamic_loss_scale",
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
