"""Flax NNX models whose params carry logical axis names for the sharding rules.

Logical names used: `vocab`, `embed`, `pos`, `heads`, `kv`, `mlp`, `norm`, `classes`,
`conv_h`, `conv_w`, `conv_in`, `conv_out`, and `layers` for the stacked layer axis of a
scanned GPT (no preset splits it). Each model reports its parameter count
(`param_count(model)`) and training FLOPs (`flops_per_token` / `flops_per_example`).
"""

from .annotate import kernel_init, logical_axes, ones_init, param_count, zeros_init
from .cnn import CNN, Backbone
from .gpt import GPT, generate
from .mlp import MLP
from .resnet import ResNet

__all__ = [
    "CNN",
    "GPT",
    "MLP",
    "Backbone",
    "ResNet",
    "generate",
    "kernel_init",
    "logical_axes",
    "ones_init",
    "param_count",
    "zeros_init",
]
