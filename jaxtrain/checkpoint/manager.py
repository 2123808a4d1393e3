"""Orbax checkpoints of a TrainState, with a JSON record of the model they belong to.

Each step's folder holds two Orbax items: `state` (the state's arrays, a standard PyTree
checkpoint that plain `orbax.checkpoint` restores) and `meta` (JSON: the model's name,
config and param shapes, the step's metrics, the run's config). No pickle anywhere.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..errors import JaxtrainError
from ..transforms.paths import path_str


def model_signature(config: dict, params) -> dict:
    """What identifies a model: its config and the shape of every param, by path."""
    shapes = {
        path_str(kp): list(leaf.shape)
        for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    return {"config": config, "param_shapes": shapes}


def signature_mismatch(saved: dict, current: dict) -> str | None:
    """A one-line description of how two model signatures differ, or None."""
    a, b = saved.get("param_shapes", {}), current.get("param_shapes", {})
    missing = sorted(set(b) - set(a))
    extra = sorted(set(a) - set(b))
    shaped = sorted(p for p in set(a) & set(b) if a[p] != b[p])
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:5])}")
    if extra:
        parts.append(f"extra {', '.join(extra[:5])}")
    if shaped:
        parts.append("mis-shaped " + ", ".join(f"{p} {a[p]} vs {b[p]}" for p in shaped[:5]))
    if not parts and saved.get("config") != current.get("config"):
        parts.append(f"config {saved.get('config')} vs {current.get('config')}")
    return "; ".join(parts) or None


class Manager:
    """Save and restore TrainStates in `directory` (Orbax `CheckpointManager`)."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = None,
                 async_save: bool = False, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise JaxtrainError(f"checkpoint folder {directory} does not exist")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, signature: dict, metrics: dict | None = None,
             config: dict | None = None) -> None:
        """Save the state's arrays and its JSON record at `step`."""
        meta = {"step": int(step), "model": signature, "metrics": metrics or {},
                "config": config or {}}
        self._mngr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.saveable()),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def wait(self) -> None:
        """Block until any async save has finished."""
        self._mngr.wait_until_finished()

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise JaxtrainError(f"no checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise JaxtrainError(
                f"no checkpoint at step {step} in {self.directory} (steps: {steps})"
            )
        return step

    def meta(self, step: int | None = None) -> dict:
        """The JSON record of a step (default: the latest)."""
        step = self._step(step)
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore_arrays(self, step: int | None = None) -> dict:
        """The saved arrays as plain nested dicts (no target needed; same topology)."""
        step = self._step(step)
        restored = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored["state"]

    def restore(self, like, signature: dict, step: int | None = None):
        """A TrainState shaped and sharded like `like`, with the saved arrays of `step`."""
        step = self._step(step)
        problem = signature_mismatch(self.meta(step)["model"], signature)
        if problem:
            raise JaxtrainError(
                f"checkpoint {self.directory} step {step} is of another model: {problem}"
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like.saveable())
        restored = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return like.with_saved(restored["state"])

    def close(self) -> None:
        self._mngr.close()


def check_same_model(directory: str | Path, signature: dict) -> None:
    """Refuse a folder that already holds checkpoints of a different model."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    mngr = Manager(directory, read_only=True)
    try:
        if mngr.steps():
            problem = signature_mismatch(mngr.meta()["model"], signature)
            if problem:
                raise JaxtrainError(
                    f"{directory} already holds a checkpoint of a different model ({problem}); "
                    "choose another folder"
                )
    finally:
        mngr.close()
