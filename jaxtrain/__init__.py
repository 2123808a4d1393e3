"""jaxtrain: functional training for JAX.

Optax transforms (`jaxtrain.transforms`), sharded steps (`jaxtrain.sharding`), Flax NNX
models (`jaxtrain.models`), data (`jaxtrain.data`), the train loop (`jaxtrain.train`),
Orbax checkpoints (`jaxtrain.checkpoint`), fine-tuning (`jaxtrain.finetune`) and
tuning by measurement (`jaxtrain.tune`: sweep, compare, lr_find, find_batch_size).
"""

from . import checkpoint, data, finetune, models, sharding, train, transforms, tune
from .errors import JaxtrainError
from .tune import compare, find_batch_size, lr_find, sweep

__version__ = "0.1.0"

__all__ = [
    "JaxtrainError",
    "checkpoint",
    "data",
    "finetune",
    "models",
    "sharding",
    "train",
    "transforms",
    "tune",
    "compare",
    "find_batch_size",
    "lr_find",
    "sweep",
]
