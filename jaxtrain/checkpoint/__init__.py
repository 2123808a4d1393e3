"""Orbax checkpoints of TrainStates: save, keep policies, restore (latest, a step, the
best; onto any mesh), partial restore, and a listing for `jaxtrain ckpt ls`."""

from .config import CheckpointConfig
from .listing import format_listing, list_checkpoints
from .manager import Manager, check_same_model, flat_by_path, saved_params
from .structure import model_signature, shape_mismatch, signature_mismatch

__all__ = [
    "CheckpointConfig",
    "Manager",
    "check_same_model",
    "flat_by_path",
    "format_listing",
    "list_checkpoints",
    "model_signature",
    "saved_params",
    "shape_mismatch",
    "signature_mismatch",
]
