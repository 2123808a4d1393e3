"""The steps of a fine-tune: pretrained params into a new model, a new head, the
optimizer (frozen globs, per-group learning rates, adapters only), and the state to start
from (fresh optimizer state by default, the checkpoint's on request)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

import optax
from flax import nnx

from .. import transforms
from ..checkpoint import Manager
from ..errors import JaxtrainError
from ..models.lora import replace_module
from .load import LoadReport, load_pretrained

LORA_PARAMS = "re:(.*/)?lora_[ab]"  # the adapter params of `jaxtrain.models.lora.LoRA`


def replace_head(model: nnx.Module, new_head: nnx.Module, path: str = "head") -> nnx.Module:
    """`model` with the submodule at `path` swapped for `new_head` (freshly initialised,
    e.g. with another number of classes), in place."""
    replace_module(model, path, new_head)
    return model


def load_into(model: nnx.Module, directory: str | Path, step=None, include=("*",),
              exclude=(), mapping: dict[str, str] | None = None) -> LoadReport:
    """Load the pretrained params of `directory` into the NNX `model` by path, in place."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params, report = load_pretrained(params, directory, step, include, exclude, mapping)
    nnx.update(model, params)
    return report


def finetune_optimizer(make: Callable[[float], optax.GradientTransformation],
                       learning_rate: float, lr_scale: dict[str, float] | None = None,
                       freeze=()) -> optax.GradientTransformation:
    """`make(learning_rate)` for every param, except that params matching a pattern of
    `lr_scale` train at `learning_rate * scale` (discriminative fine-tuning; the first
    matching pattern wins) and params matching `freeze` are not updated at all."""
    lr_scale = dict(lr_scale or {})
    for pattern, scale in lr_scale.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise JaxtrainError(f"lr_scale for {pattern!r} must be a number >= 0, got "
                                f"{scale!r}")
    tx = make(learning_rate)
    if lr_scale:
        tx = transforms.per_group({p: make(learning_rate * s) for p, s in lr_scale.items()},
                                  default=tx)
    if freeze:
        tx = optax.chain(tx, transforms.freeze(freeze))
    return tx


def _regex(pattern: str) -> str:
    return pattern[3:] if pattern.startswith("re:") else fnmatch.translate(pattern)


def lora_optimizer(tx: optax.GradientTransformation, also=()) -> optax.GradientTransformation:
    """`tx` on the LoRA adapters (and on the params matching `also`, such as a new head);
    the other params get no update and no optimizer state, so the frozen base costs no
    optimizer memory."""
    also = [also] if isinstance(also, str) else list(also)
    trained = LORA_PARAMS if not also else "re:" + "|".join(
        [f"(?:{LORA_PARAMS[3:]})"] + [f"(?:{_regex(g)})" for g in also])
    return transforms.per_group({trained: tx}, default=optax.set_to_zero())


def start_from(state, directory: str | Path, step=None, *, restore_optimizer: bool = False,
               include=("*",), exclude=(), mapping: dict[str, str] | None = None):
    """`state` (a fresh TrainState of the new model) with the pretrained params of
    `directory` loaded by path and its optimizer state initialised afresh for them; with
    `restore_optimizer`, the checkpoint's optimizer state instead (which must have the
    same structure). Returns `(state, LoadReport)`."""
    params, report = load_pretrained(state.params, directory, step, include, exclude, mapping)
    state = state.replace(params=params, opt_state=state.tx.init(params))
    if restore_optimizer:
        with Manager(directory, read_only=True) as mngr:
            state = mngr.restore(state, None, step, items=["opt_state"])
    return state, report
