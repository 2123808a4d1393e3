"""Step-level training strategies: DP-SGD, distillation, float16 loss scaling, local SGD /
DiLoCo."""

from .local_sgd import LocalSGDState, all_reduce_stats, make_local_sgd_round
from .local_sgd import state_shardings as local_sgd_shardings
from .loss_scaling import make_loss_scaled_step
from .privacy import dp_epsilon, make_dp_train_step, per_example_grads

__all__ = [
    "LocalSGDState",
    "all_reduce_stats",
    "dp_epsilon",
    "local_sgd_shardings",
    "make_dp_train_step",
    "make_local_sgd_round",
    "make_loss_scaled_step",
    "per_example_grads",
]
