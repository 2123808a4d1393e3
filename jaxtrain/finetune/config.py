"""The `finetune` section of a fine-tune config (`jaxtrain finetune`): a run config plus
what to load from the pretrained checkpoint and how to adapt it."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option, section
from ..train.config import RunConfig


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (`jaxtrain.models.lora.apply_lora`): only they are trained."""

    targets: str | list | None = option(None, "globs (or re: regexes) of the Linear layers "
                                              "to adapt", required=True)
    rank: int = option(8, "rank of each adapter")
    alpha: float | None = option(None, "scale alpha / rank of the adapter's output (null: "
                                       "alpha = rank)")
    dropout: float = option(0.0, "dropout on the adapter's input while training")
    train_also: str | list = option([], "globs of params trained in full besides the "
                                        "adapters (a new head)")


@dataclass(frozen=True)
class FinetuneConfig:
    """What is loaded from the pretrained checkpoint, and what is trained."""

    step: int | str | None = option(None, "pretrained step: null (latest), best, or a number")
    include: str | list = option(["*"], "pretrained params to load (globs / re: regexes)")
    exclude: str | list = option([], "pretrained params not to load (a new head stays fresh)")
    mapping: dict = option({}, "renamed modules: {old/prefix/: new/prefix/}")
    lora: LoraConfig | None = option(None, "train low-rank adapters only (null: no LoRA)")
    restore_optimizer: bool = option(False, "take the pretrained optimizer state instead of a "
                                            "fresh one")
    from_: str | None = option(None, "the pretrained checkpoint folder (set by --from)",
                               key="from")


@dataclass(frozen=True)
class FinetuneRunConfig(RunConfig):
    """A run config plus its `finetune` section."""

    finetune: FinetuneConfig = section(FinetuneConfig, "what is loaded and trained "
                                                       "(jaxtrain.finetune)")
