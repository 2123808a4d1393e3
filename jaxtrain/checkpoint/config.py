"""The `checkpoint` section of a run config: when and where Orbax checkpoints are saved."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of the train state (see `jaxtrain.checkpoint.Manager`)."""

    dir: str | None = option(None, "checkpoint folder (null: OUT/checkpoints for a run "
                                   "config; no checkpoints for a Python Trainer)")
    every: int | None = option(None, "save every this many steps (null: never on a count)",
                               positive=True)
    best: bool = option(False, "also save at each evaluation that improves the monitored "
                               "metric, and keep the best step")
    at_end: bool = option(True, "save when training ends")
    max_to_keep: int | None = option(3, "newest checkpoints kept (null: all)", positive=True)
    async_: bool = option(True, "save in the background while training goes on",
                          key="async")
