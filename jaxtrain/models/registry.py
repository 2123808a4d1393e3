"""Models by name, for configs: `build('cnn', seed=0, num_classes=10)`."""

from __future__ import annotations

from flax import nnx

from ..errors import JaxtrainError
from .cnn import CNN
from .gpt import GPT
from .mlp import MLP
from .resnet import ResNet

MODELS = {"cnn": CNN, "gpt": GPT, "mlp": MLP, "resnet": ResNet}


def build(name: str, seed: int = 0, **kwargs) -> nnx.Module:
    """A model of the named kind, built with `kwargs`; params are not placed on devices
    (eager sharding is off), so the sharding module decides where they go."""
    if name not in MODELS:
        raise JaxtrainError(f"unknown model {name!r} (valid: {', '.join(sorted(MODELS))})")
    for key, value in kwargs.items():  # every integer argument of these models is a size
        sizes = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in sizes):
            raise JaxtrainError(f"model {name!r}: {key} must be a positive integer (a size), "
                                f"got {value!r}")
    try:
        with nnx.use_eager_sharding(False):
            return MODELS[name](**kwargs, rngs=nnx.Rngs(seed))
    except TypeError as err:
        raise JaxtrainError(f"model {name!r}: {err}") from None
