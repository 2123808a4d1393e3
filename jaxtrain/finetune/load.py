"""Pretrain -> fine-tune: load pretrained params into a new model by path.

`load_pretrained` copies every saved param whose path (after `mapping`) and shape match a
param of the new model and that `include`/`exclude` select; the rest keep their fresh
initialisation. The returned report lists loaded, skipped and new paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from ..checkpoint import flat_by_path, saved_params
from ..errors import JaxtrainError
from ..transforms.paths import matches, path_str


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    skipped: dict[str, str]  # saved path -> why it was not used
    new: list[str]  # params of the new model left as initialised

    def summary(self) -> str:
        return f"loaded {len(self.loaded)}, skipped {len(self.skipped)}, new {len(self.new)}"


def load_pretrained(params, directory: str | Path, step: int | None = None,
                    include=("*",), exclude=(), mapping: dict[str, str] | None = None):
    """`params` with pretrained values from the checkpoint in `directory`.

    `mapping` renames saved path prefixes (`{'encoder/': 'backbone/'}`) before matching.
    Returns `(params, LoadReport)`.
    """
    saved = saved_params(directory, step, "pretrained checkpoint")
    target = flat_by_path(params)
    loaded, skipped, values = [], {}, {}
    for saved_path, value in saved.items():
        path = saved_path
        for old, new in (mapping or {}).items():
            if path.startswith(old):
                path = new + path[len(old):]
                break
        if not matches(path, include) or matches(path, exclude):
            skipped[saved_path] = "not selected"
        elif path not in target:
            skipped[saved_path] = "no such param in the new model"
        elif tuple(value.shape) != tuple(target[path].shape):
            skipped[saved_path] = f"shape {tuple(value.shape)} vs {tuple(target[path].shape)}"
        else:
            values[path] = value
            loaded.append(path)
    if not loaded:
        raise JaxtrainError(f"no param of {directory} matches the new model ({len(skipped)} "
                            "skipped); check include/exclude and mapping")

    def pick(kp, leaf):
        path = path_str(kp)
        if path not in values:
            return leaf
        value = jnp.asarray(values[path], leaf.dtype)
        sharding = getattr(leaf, "sharding", None)  # keep the new model's placement
        return value if sharding is None else jax.device_put(value, sharding)

    new_params = jax.tree_util.tree_map_with_path(pick, params)
    report = LoadReport(loaded=sorted(loaded), skipped=skipped,
                        new=sorted(set(target) - set(values)))
    return new_params, report
