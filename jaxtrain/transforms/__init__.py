"""Pure gradient transformations in the Optax protocol: optimizers, schedules, wrappers."""

from . import masks, schedules, spec
from .ademamix import ademamix
from .decay import add_decoupled_weight_decay, add_l1, add_l2
from .find import find_state, find_states
from .hyperparams import current_hyperparams, set_hyperparams
from .kron import psgd_kron
from .loss_scale import dynamic_loss_scale, loss_scale_state, loss_scale_value, next_loss_scale
from .low_precision import (
    fp32_master,
    low_precision_state,
    stochastic_round_bf16,
    stochastic_rounding,
)
from .mars import mars
from .optimizers import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adam_8bit,
    adamax,
    adamw,
    adamw_8bit,
    amsgrad,
    ema_momentum,
    lamb,
    lars,
    lion,
    nadam,
    nadamw,
    normalized_sgd,
    radam,
    rmsprop,
    schedule_free_adamw,
    schedule_free_eval_params,
    sgd,
)
from .orthogonal import muon
from .paths import matches, path_list, path_mask, path_str, tree_paths
from .plateau import reduce_on_plateau
from .privacy import dp_aggregate, dp_sgd
from .pruning import magnitude_prune, polynomial_sparsity, sparsity_report
from .second_order import lbfgs, newton, newton_cg
from .shampoo import shampoo
from .soap import soap
from .staleness import stale_gradients
from .wrappers import (
    accumulate,
    adaptive_grad_clip,
    clip,
    clip_by_global_norm,
    ema,
    ema_params,
    freeze,
    lookahead,
    per_group,
    skip_nonfinite,
)

__all__ = [
    "find_state",
    "find_states",
    "accumulate",
    "adaptive_grad_clip",
    "clip",
    "clip_by_global_norm",
    "ema",
    "ema_params",
    "lookahead",
    "set_hyperparams",
    "skip_nonfinite",
    "stale_gradients",
    "add_decoupled_weight_decay",
    "add_l1",
    "add_l2",
    "masks",
    "schedules",
    "spec",
    "adadelta",
    "ademamix",
    "mars",
    "psgd_kron",
    "shampoo",
    "soap",
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
    "adam_8bit",
    "adamw",
    "adamw_8bit",
    "current_hyperparams",
    "dp_aggregate",
    "dp_sgd",
    "freeze",
    "stochastic_rounding",
    "stochastic_round_bf16",
    "low_precision_state",
    "fp32_master",
    "loss_scale_state",
    "loss_scale_value",
    "next_loss_scale",
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
