"""Flax NNX models whose params carry logical axis names for the sharding rules."""

from .annotate import kernel_init, logical_axes, zeros_init
from .cnn import CNN, Backbone

__all__ = ["CNN", "Backbone", "kernel_init", "logical_axes", "zeros_init"]
