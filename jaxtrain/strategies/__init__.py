"""Step-level training strategies: DP-SGD, distillation, local SGD / DiLoCo (float16 loss
scaling is `jaxtrain.train.make_train_step`'s)."""

from .distill import distillation_loss, load_teacher, make_distill_loss
from .local_sgd import LocalSGDState, all_reduce_stats, make_local_sgd_round
from .local_sgd import state_shardings as local_sgd_shardings
from .privacy import dp_epsilon, make_dp_train_step, per_example_grads

__all__ = [
    "LocalSGDState",
    "all_reduce_stats",
    "distillation_loss",
    "load_teacher",
    "dp_epsilon",
    "local_sgd_shardings",
    "make_distill_loss",
    "make_dp_train_step",
    "make_local_sgd_round",
    "per_example_grads",
]
