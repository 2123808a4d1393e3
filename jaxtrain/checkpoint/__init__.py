"""Orbax checkpoints of TrainStates."""

from .manager import Manager, check_same_model, model_signature, signature_mismatch

__all__ = ["Manager", "check_same_model", "model_signature", "signature_mismatch"]
