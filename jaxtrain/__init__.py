"""jaxtrain: functional training for JAX.

Optax transforms (`jaxtrain.transforms`), sharded steps (`jaxtrain.sharding`), Flax NNX
models (`jaxtrain.models`), data (`jaxtrain.data`), the train loop (`jaxtrain.train`),
Orbax checkpoints (`jaxtrain.checkpoint`) and fine-tuning (`jaxtrain.finetune`).
"""

from . import checkpoint, data, finetune, models, sharding, train, transforms
from .errors import JaxtrainError

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
]
