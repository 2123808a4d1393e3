"""A small ResNet (basic blocks, BatchNorm) for small images such as the 8x8 digits.

BatchNorm's running statistics are `nnx.BatchStat` variables: `TrainState` carries them
as `model_state` (not trained, updated by each train step); `model.eval()` switches to
the running averages. Convolutions (conv_h, conv_w, conv_in, conv_out); norms (norm,).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from ..errors import JaxtrainError
from .annotate import kernel_init, ones_init, param_dtype, zeros_init
from .flops import conv2d
from .init import DEFAULT, initializer

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _conv(c_in: int, c_out: int, size: int, stride: int, init: str, rngs: nnx.Rngs
          ) -> nnx.Conv:
    return nnx.Conv(c_in, c_out, (size, size), strides=(stride, stride), padding="SAME",
                    use_bias=False, rngs=rngs, kernel_init=kernel_init(CONV_AXES,
                                                                       initializer(init)))


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm whose output keeps the input's dtype: its float32 statistics would
    otherwise turn a bfloat16 network float32 from the first normalisation on."""

    def __call__(self, x, **kwargs):
        return super().__call__(x, **kwargs).astype(x.dtype)


def _bn(c: int, rngs: nnx.Rngs) -> BatchNorm:
    return BatchNorm(c, momentum=0.9, scale_init=ones_init(("norm",)),
                     bias_init=zeros_init(("norm",)), rngs=rngs)


class BasicBlock(nnx.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), with a strided 1x1 projection when the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, init: str = "he_normal", *,
                 rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv(c_in, c_out, 3, stride, init, rngs), _bn(c_out, rngs)
        self.conv2, self.bn2 = _conv(c_out, c_out, 3, 1, init, rngs), _bn(c_out, rngs)
        project = stride != 1 or c_in != c_out
        self.proj = _conv(c_in, c_out, 1, stride, init, rngs) if project else None
        self.proj_bn = _bn(c_out, rngs) if project else None

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(y + skip)


class ResNet(nnx.Module):
    """Stem conv, `len(stage_sizes)` stages (width doubling, stride 2 after the first),
    global average pooling, linear head. Images (N, H, W) or (N, H, W, C).

    `init` None (the default) draws the convolutions with `he_normal` (He et al.'s rule
    for ReLU nets, as the ResNet paper) and the head with `lecun_normal`; a name of
    `jaxtrain.models.init` draws every kernel, convolutions and head, by that rule."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16,
                 stage_sizes: Sequence[int] = (1, 1, 1), init: str | None = None, *,
                 rngs: nnx.Rngs):
        if not stage_sizes or any(n < 1 for n in stage_sizes):
            raise JaxtrainError(f"ResNet stage_sizes must be positive, got {list(stage_sizes)}")
        self.config = {"name": "ResNet", "num_classes": num_classes,
                       "in_channels": in_channels, "width": width,
                       "stage_sizes": list(stage_sizes)}
        conv_init, head_init = ("he_normal", DEFAULT) if init is None else (init, init)
        head_draw = initializer(head_init)  # an unknown name is refused before any work
        self.stem = _conv(in_channels, width, 3, 1, conv_init, rngs)
        self.stem_bn = _bn(width, rngs)
        stages, c = [], width
        for s, n in enumerate(stage_sizes):
            c_out = width * 2**s
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if s > 0 and b == 0 else 1, conv_init,
                                         rngs=rngs))
                c = c_out
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(c, num_classes, kernel_init=kernel_init(("embed", "classes"),
                                                                       head_draw),
                               bias_init=zeros_init(("classes",)), rngs=rngs)

    def __call__(self, x):
        if x.ndim == 3:
            x = x[..., None]
        x = jax.nn.relu(self.stem_bn(self.stem(x.astype(param_dtype(self)))))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.head(x.mean(axis=(1, 2)))

    def flops_per_example(self, image_shape: Sequence[int], training: bool = True) -> float:
        """Convolution and head FLOPs (2 per multiply-add, padding excluded) for one
        (H, W[, C]) image; BatchNorm, ReLU and pooling are not counted. `training`: 3x
        forward."""
        h, w = image_shape[:2]
        cfg = self.config
        c, width = cfg["width"], cfg["width"]
        total, h, w = conv2d(h, w, 3, 1, cfg["in_channels"], c)
        for s, n in enumerate(cfg["stage_sizes"]):
            c_out = width * 2**s
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                if stride != 1 or c != c_out:
                    total += conv2d(h, w, 1, stride, c, c_out)[0]
                f1, h, w = conv2d(h, w, 3, stride, c, c_out)
                total += f1 + conv2d(h, w, 3, 1, c_out, c_out)[0]
                c = c_out
        total += 2 * c * cfg["num_classes"]
        return float(3 * total if training else total)
