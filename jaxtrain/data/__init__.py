"""Data sets that ship with the install, and resumable input pipelines."""

from .digits import digits_split, load_digits
from .pipeline import Pipeline, batch_at, batches, epoch_order, eval_batches, host_slice
from .synthetic import synthetic_classification, synthetic_regression
from .text import STDLIB_FILES, decode, encode, load_text, stdlib_corpus

__all__ = [
    "STDLIB_FILES",
    "Pipeline",
    "batch_at",
    "batches",
    "decode",
    "digits_split",
    "encode",
    "epoch_order",
    "eval_batches",
    "host_slice",
    "load_digits",
    "load_text",
    "stdlib_corpus",
    "synthetic_classification",
    "synthetic_regression",
]
