"""Step-level training strategies: DP-SGD, distillation, local SGD / DiLoCo."""

from .privacy import dp_epsilon, make_dp_train_step, per_example_grads

__all__ = ["dp_epsilon", "make_dp_train_step", "per_example_grads"]
