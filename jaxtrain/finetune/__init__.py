"""Pretrain -> fine-tune: load pretrained params by path into a new model, replace a
head, freeze by glob, per-group learning rates, LoRA adapters (merged back for export),
optimizer state fresh by default or restored on request; `jaxtrain finetune`."""

from ..models.lora import LoRA, apply_lora, merge_lora
from .flows import finetune_optimizer, load_into, lora_optimizer, replace_head, start_from
from .load import LoadReport, load_pretrained

__all__ = [
    "LoRA",
    "LoadReport",
    "apply_lora",
    "finetune_optimizer",
    "load_into",
    "load_pretrained",
    "lora_optimizer",
    "merge_lora",
    "replace_head",
    "start_from",
]
