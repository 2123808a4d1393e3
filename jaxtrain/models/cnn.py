"""The digits CNN: a small convolutional backbone and a linear classification head.

Param paths: `backbone/conv1/*`, `backbone/conv2/*`, `backbone/dense/*`, `head/*`, so that
a fine-tune can load `backbone/*`, replace `head`, and freeze by glob.
"""

from __future__ import annotations

import jax
from flax import nnx

from ..errors import JaxtrainError
from .annotate import kernel_init, param_dtype, zeros_init
from .flops import conv2d
from .init import DEFAULT, initializer


class Backbone(nnx.Module):
    """Two 3x3 convolutions and a dense layer: 8x8x1 images -> `features` vectors."""

    def __init__(self, channels: int = 16, features: int = 64, init: str = DEFAULT, *,
                 rngs: nnx.Rngs):
        draw = initializer(init)
        self.conv1 = nnx.Conv(
            1, channels, (3, 3), rngs=rngs,
            kernel_init=kernel_init(("conv_h", "conv_w", "conv_in", "conv_out"), draw),
            bias_init=zeros_init(("conv_out",)),
        )
        self.conv2 = nnx.Conv(
            channels, 2 * channels, (3, 3), rngs=rngs,
            kernel_init=kernel_init(("conv_h", "conv_w", "conv_in", "conv_out"), draw),
            bias_init=zeros_init(("conv_out",)),
        )
        self.dense = nnx.Linear(
            2 * channels * 16, features, rngs=rngs,
            kernel_init=kernel_init(("embed", "mlp"), draw),
            bias_init=zeros_init(("mlp",)),
        )

    def __call__(self, x):
        if x.shape[1:] != (8, 8, 1):  # else a shape error deep inside conv or dense
            raise JaxtrainError(
                f"the cnn model takes 8x8 images with 1 channel (its dense layer reads the 4x4 "
                f"map pooled from them), got images of shape {tuple(x.shape[1:])} (batch "
                f"{tuple(x.shape)}); resize them (jaxtrain data prepare images --image-size 8 "
                f"8) or pick a model for that size")
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return jax.nn.relu(self.dense(x))


class CNN(nnx.Module):
    """Digits classifier: `Backbone` then a linear `head` to `num_classes` logits; every
    kernel drawn by `init` (a name in `jaxtrain.models.init`), biases zero."""

    def __init__(self, num_classes: int = 10, channels: int = 16, features: int = 64,
                 init: str = DEFAULT, *, rngs: nnx.Rngs):
        self.config = {"name": "CNN", "num_classes": num_classes, "channels": channels,
                       "features": features}
        self.backbone = Backbone(channels, features, init, rngs=rngs)
        self.head = nnx.Linear(
            features, num_classes, rngs=rngs,
            kernel_init=kernel_init(("mlp", "classes"), initializer(init)),
            bias_init=zeros_init(("classes",)),
        )

    def __call__(self, x):
        if x.ndim == 3:
            x = x[..., None]
        return self.head(self.backbone(x.astype(param_dtype(self))))

    def flops_per_example(self, training: bool = True) -> float:
        """Convolution and dense FLOPs (2 per multiply-add, padding excluded) for one 8x8
        image; activations and pooling are not counted. `training`: 3x forward."""
        c = self.config
        ch, feats = c["channels"], c["features"]
        total = conv2d(8, 8, 3, 1, 1, ch)[0] + conv2d(8, 8, 3, 1, ch, 2 * ch)[0]
        total += 2 * (2 * ch * 16 * feats + feats * c["num_classes"])
        return float(3 * total if training else total)
