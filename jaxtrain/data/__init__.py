"""Data sets that ship with the install, and resumable input pipelines."""

from .digits import digits_split, load_digits
from .pipeline import batch_at, batches, epoch_order, eval_batches

__all__ = ["batch_at", "batches", "digits_split", "epoch_order", "eval_batches", "load_digits"]
