"""Step-level training strategies: DP-SGD, distillation, local SGD / DiLoCo, a parameter
server on Ray actors (float16 loss scaling is `jaxtrain.train.make_train_step`'s)."""

from .distill import distillation_loss, load_teacher, make_distill_loss
from .local_sgd import LocalSGDState, all_reduce_stats, make_local_sgd_round
from .local_sgd import state_shardings as local_sgd_shardings
from .param_server import ParamServerPool, ParamServerResult, train_param_server
from .privacy import dp_epsilon, make_dp_train_step, per_example_grads

__all__ = [
    "LocalSGDState",
    "ParamServerPool",
    "ParamServerResult",
    "all_reduce_stats",
    "distillation_loss",
    "load_teacher",
    "dp_epsilon",
    "local_sgd_shardings",
    "make_distill_loss",
    "make_dp_train_step",
    "make_local_sgd_round",
    "per_example_grads",
    "train_param_server",
]
