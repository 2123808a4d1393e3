"""Orbax checkpoints of a TrainState, with a JSON record of the model they belong to.

Each step's folder holds two Orbax items: `state` (the state's arrays, a standard PyTree
checkpoint that plain `orbax.checkpoint` restores) and `meta` (JSON: the model's name,
config and param shapes, the step's metrics, the run's config, the data position). No
pickle anywhere. Saves are asynchronous by default: `save` returns once the arrays are
copied off the device and Orbax writes them in a background thread into a temporary
folder that is renamed into place when complete, so a crash never leaves a partial step.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ..errors import JaxtrainError
from .structure import model_signature, path_shapes, shape_mismatch, signature_mismatch

__all__ = ["Manager", "check_same_model", "model_signature", "signature_mismatch"]

BEST_MODES = ("min", "max")


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 1):
        raise JaxtrainError(f"{name} must be a positive integer or None, got {value!r}")


def _jsonable(metrics: dict | None) -> dict:
    """Metrics as JSON numbers where they are scalars (device arrays included)."""
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            out[str(key)] = value
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


class Manager:
    """Save and restore TrainStates in `directory` (an Orbax `CheckpointManager`).

    Keeps the newest `max_to_keep` steps (None: all), every `keep_period`-th step, and,
    with `best_metric`, the best step by that metric (`best_mode` 'min' or 'max').
    """

    def __init__(self, directory: str | Path, max_to_keep: int | None = None,
                 keep_period: int | None = None, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, read_only: bool = False):
        _positive("max_to_keep", max_to_keep)
        _positive("keep_period", keep_period)
        if best_mode not in BEST_MODES:
            raise JaxtrainError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise JaxtrainError(f"checkpoint folder {directory} does not exist")
        if self.directory.exists() and not self.directory.is_dir():
            raise JaxtrainError(f"checkpoint folder {directory} is a file, not a folder")
        self.best_metric, self.best_mode = best_metric, best_mode
        self.read_only = read_only
        self.last_save_seconds: float | None = None  # how long the last save() held the caller
        self.restored_step: int | None = None
        self._unreadable: set[int] = set()
        keep = [policies.LatestN(n=max_to_keep)]
        if keep_period is not None:
            keep.append(policies.EveryNSteps(keep_period))
        if best_metric is not None:
            keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric],
                                       reverse=best_mode == "min", n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            preservation_policy=None if read_only else policies.AnyPreservationPolicy(keep),
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[int]:
        """The steps whose checkpoints are complete on disk, oldest first."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def delete(self, step: int) -> None:
        """Remove the checkpoint of `step` (for a caller replacing its own output)."""
        if int(step) not in self.steps():
            raise JaxtrainError(f"no checkpoint at step {step} in {self.directory}")
        self._mngr.delete(int(step))

    def save(self, step: int, state, signature: dict, metrics: dict | None = None,
             config: dict | None = None, data: dict | None = None) -> None:
        """Save the state's arrays and its JSON record (model signature, metrics, run
        config, data position `data`) at `step`; returns before an async write is done."""
        step = int(step)
        if step in self.steps():
            if step not in self._unreadable:
                raise JaxtrainError(f"{self.directory} already holds a checkpoint at step "
                                    f"{step}; nothing was overwritten")
            warnings.warn(f"replacing unreadable checkpoint {self.directory / str(step)}",
                          stacklevel=2)
            self._mngr.delete(step)
        metrics = _jsonable(metrics)
        meta = {"step": step, "model": signature, "metrics": metrics, "config": config or {},
                "data": data or {},
                "best": {"metric": self.best_metric, "mode": self.best_mode}}
        tracked = metrics if self.best_metric in metrics else None
        start = time.perf_counter()
        self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state.saveable()),
                                    meta=ocp.args.JsonSave(meta)),
            metrics=tracked,
            force=True,
        )
        self.last_save_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Block until any async save has finished."""
        self._mngr.wait_until_finished()

    def _settle(self) -> None:
        if not self.read_only:
            self.wait()

    def _step(self, step: int | str | None) -> int:
        steps = self.steps()
        if not steps:
            raise JaxtrainError(f"no checkpoint in {self.directory}")
        if step is None or step == "latest":
            return steps[-1]
        if step == "best":
            return self.best_step()
        if step not in steps:
            raise JaxtrainError(
                f"no checkpoint at step {step} in {self.directory} (steps: {steps})"
            )
        return step

    def meta(self, step: int | str | None = None) -> dict:
        """The JSON record of a step (default: the latest; also 'best')."""
        self._settle()
        step = self._step(step)
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def best_step(self, metric: str | None = None, mode: str | None = None) -> int:
        """The step with the best `metric` (default: the one this folder was saved with)."""
        self._settle()
        records = {}
        for step in self.steps():
            try:
                records[step] = self.meta(step)
            except Exception:  # an unreadable record cannot be the best one
                continue
        recorded = next((r.get("best", {}) for r in reversed(records.values())), {})
        metric = metric or self.best_metric or recorded.get("metric")
        mode = mode or (self.best_mode if self.best_metric else recorded.get("mode", "min"))
        if metric is None:
            raise JaxtrainError(f"no best metric was recorded in {self.directory}; ask for "
                                "a step number or the latest")
        scored = {s: r["metrics"][metric] for s, r in records.items()
                  if isinstance(r.get("metrics", {}).get(metric), (int, float))}
        if not scored:
            raise JaxtrainError(f"no checkpoint in {self.directory} has metric {metric!r}")
        pick = min if mode == "min" else max
        return pick(scored, key=lambda s: (scored[s], s))

    def saved_shapes(self, step: int) -> dict:
        """`{path: shape}` of every array saved at `step` (read from Orbax's metadata)."""
        return path_shapes(self._mngr.item_metadata(step)["state"].tree)

    def _candidates(self, step) -> tuple[list[int], bool]:
        if step is None or step == "latest":
            steps = self.steps()
            if not steps:
                raise JaxtrainError(f"no checkpoint in {self.directory}")
            return steps[::-1], True
        return [self._step(step)], False

    def _unusable(self, step: int, err: Exception, fallback: bool) -> None:
        where = self.directory / str(step)
        if not fallback:
            raise JaxtrainError(f"checkpoint {where} is unreadable ({_first_line(err)})")
        self._unreadable.add(step)
        warnings.warn(f"skipping unreadable checkpoint {where} ({_first_line(err)}); "
                      "falling back to the previous one", stacklevel=3)

    def restore(self, like, signature: dict | None = None, step: int | str | None = None,
                items=None):
        """`like` (a TrainState) with the saved arrays of `step`, placed with `like`'s
        shardings, so a state saved on one mesh restores onto another.

        `step`: None or 'latest' (the newest readable step; unreadable newer ones are
        skipped with a warning), 'best', or a step number. `items`: which parts of the
        state to restore (say `['params']`); the rest keep `like`'s values.
        """
        self._settle()
        wanted = like.saveable()
        items = list(wanted) if items is None else list(items)
        unknown = sorted(set(items) - set(wanted))
        if unknown:
            raise JaxtrainError(f"unknown state items {unknown} (valid: {sorted(wanted)})")
        target = {k: jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted[k]) for k in items}
        candidates, fallback = self._candidates(step)
        for candidate in candidates:
            try:
                record = self.meta(candidate)
                saved = self.saved_shapes(candidate)
            except Exception as err:  # a damaged step: Orbax and TensorStore errors vary
                self._unusable(candidate, err, fallback)
                continue
            where = f"checkpoint {self.directory} step {candidate}"
            problem = signature_mismatch(record["model"], signature) if signature else None
            if problem:
                raise JaxtrainError(f"{where} is of another model: {problem}")
            saved = {p: s for p, s in saved.items() if p.split("/")[0] in items}
            problem = shape_mismatch(saved, path_shapes(target))
            if problem:
                raise JaxtrainError(f"{where} does not match the state to restore: {problem}")
            try:
                restored = self._mngr.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )))["state"]
            except Exception as err:
                self._unusable(candidate, err, fallback)
                continue
            self.restored_step = candidate
            return like.with_saved({**wanted, **restored})
        raise JaxtrainError(f"no readable checkpoint in {self.directory} "
                            f"(tried steps {candidates})")

    def restore_arrays(self, step: int | str | None = None, items=None) -> dict:
        """The saved arrays (of `items`, default all) as nested dicts on the default
        device; needs no target and works whatever mesh the checkpoint was saved on."""
        self._settle()
        step = self._step(step)
        tree = self._mngr.item_metadata(step)["state"].tree
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {
            k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            v)
            for k, v in tree.items() if items is None or k in items
        }
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        return restored["state"]

    def close(self) -> None:
        self._mngr.close()


def check_same_model(directory: str | Path, signature: dict) -> None:
    """Refuse a folder that already holds checkpoints of a different model."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    with Manager(directory, read_only=True) as mngr:
        if mngr.steps():
            problem = signature_mismatch(mngr.meta()["model"], signature)
            if problem:
                raise JaxtrainError(
                    f"{directory} already holds a checkpoint of a different model ({problem}); "
                    "choose another folder"
                )
