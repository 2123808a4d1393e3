"""A multilayer perceptron: flattened inputs, hidden layers, a linear head.

Kernels alternate (embed, mlp), (mlp, embed), ... (Megatron-style: a tensor-parallel
split needs one all-reduce per pair); the head is (embed|mlp, classes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import JaxtrainError
from .annotate import kernel_init, param_dtype, zeros_init
from .init import DEFAULT, initializer

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh,
               "silu": jax.nn.silu}


class MLP(nnx.Module):
    """`in_features` (or an input shape, flattened) -> `hidden` -> `out_features`; every
    kernel drawn by `init` (a name in `jaxtrain.models.init`), biases zero. From a config,
    the data's number of classes (or regression targets) sets `out_features` and its
    number of features `in_features` (`DATA_ARGS`)."""

    # data info key -> the constructor argument it fills (jaxtrain.train.run.model_kwargs)
    DATA_ARGS = {"num_classes": "out_features", "targets": "out_features",
                 "features": "in_features"}

    def __init__(self, in_features: int | Sequence[int] = 64, out_features: int = 10,
                 hidden: Sequence[int] = (128, 128), activation: str = "relu",
                 init: str = DEFAULT, *, rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise JaxtrainError(f"MLP activation={activation!r}: valid are "
                                f"{', '.join(sorted(ACTIVATIONS))}")
        n_in = in_features if isinstance(in_features, int) else math.prod(in_features)
        self.config = {"name": "MLP", "in_features": n_in, "out_features": out_features,
                       "hidden": list(hidden), "activation": activation}
        self.activation = activation
        draw = initializer(init)
        widths = [n_in, *hidden]
        names = ("embed", "mlp")
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            axes = names if i % 2 == 0 else names[::-1]
            layers.append(nnx.Linear(a, b, kernel_init=kernel_init(axes, draw),
                                     bias_init=zeros_init(axes[1:]), rngs=rngs))
        self.layers = nnx.List(layers)
        last = names[len(hidden) % 2]
        self.head = nnx.Linear(widths[-1], out_features, rngs=rngs,
                               kernel_init=kernel_init((last, "classes"), draw),
                               bias_init=zeros_init(("classes",)))

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(param_dtype(self))
        act = ACTIVATIONS[self.activation]
        for layer in self.layers:
            x = act(layer(x))
        return self.head(x)

    def flops_per_example(self, training: bool = True) -> float:
        """Matmul FLOPs (2 per multiply-add) per example; `training`: 3x forward."""
        widths = [self.config["in_features"], *self.config["hidden"],
                  self.config["out_features"]]
        forward = 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        return float(3 * forward if training else forward)
