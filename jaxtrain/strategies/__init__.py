"""Step-level training strategies: DP-SGD, distillation, local SGD / DiLoCo."""

from .loss_scaling import make_loss_scaled_step
from .privacy import dp_epsilon, make_dp_train_step, per_example_grads

__all__ = ["dp_epsilon", "make_loss_scaled_step", "make_dp_train_step", "per_example_grads"]
