"""Orbax checkpoints of a TrainState, with a JSON record of the model they belong to.

Each step's folder holds Orbax items: `state` (the state's arrays, a standard PyTree
checkpoint that plain `orbax.checkpoint` restores), `meta` (JSON: the model's name,
config and param shapes, the step's metrics, the run's config, the identity of the
prepared data it trained on, the callbacks' record, a checksum per array), Orbax's own
`metrics` (what its keep-best rule reads after a reopen) and optionally `extra` (arrays
callbacks keep, such as early stopping's best weights). No pickle anywhere. Saves are
asynchronous by default: `save` returns once the arrays are copied off the device and
Orbax writes them in a background thread into a temporary folder that is renamed into
place when complete, so a crash never leaves a partial step.

A step that cannot be read, or whose arrays do not match their checksums, is damaged: a
restore of the latest step falls back to the previous one with a warning, and a writable
manager moves the damaged folder aside (to `STEP.damaged`) so the step is saved afresh.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ..errors import JaxtrainError
from ..transforms.paths import path_str
from .checksum import checksums, mismatched
from .structure import model_signature, path_shapes, shape_mismatch, signature_mismatch

__all__ = ["Manager", "check_same_model", "model_signature", "signature_mismatch"]

BEST_MODES = ("min", "max")


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 1):
        raise JaxtrainError(f"{name} must be a positive integer or None, got {value!r}")


def _jsonable(metrics: dict | None) -> dict:
    """Metrics as JSON: scalars (device arrays included) as numbers, arrays (per-class
    values, a confusion matrix) as nested lists, strings as they are; anything else is
    refused here, before a write that would fail in the background."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, str):
            out[str(key)] = value
        elif np.ndim(value) == 0 and isinstance(np.asarray(value).item(), int | float):
            out[str(key)] = float(value)
        elif isinstance(value, np.ndarray | jax.Array | list | tuple):
            out[str(key)] = np.asarray(value).tolist()
        else:
            raise JaxtrainError(f"checkpoint metric {key!r} must be a number, an array or a "
                                f"string, got {type(value).__name__}; nothing was saved")
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


class DamagedCheckpoint(JaxtrainError):
    """A step's arrays do not match the checksums recorded when it was saved."""


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
        if read_only or self.directory.exists():
            check_folder(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.read_only = read_only
        self.last_save_seconds: float | None = None  # how long the last save() held the caller
        self.restored_step: int | None = None
        keep = [policies.LatestN(n=max_to_keep)]
        if keep_period is not None:
            keep.append(policies.EveryNSteps(keep_period))
        best_fn = None
        if best_metric is not None:
            def best_fn(metrics):
                return metrics[best_metric]

            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                       n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # with best_fn Orbax writes each step's metrics and reads them back on a
            # reopen, so the kept best step survives a resume
            best_fn=best_fn, best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            preservation_policy=None if read_only else policies.AnyPreservationPolicy(keep),
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "extra": ocp.PyTreeCheckpointHandler(),
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
             config: dict | None = None, data: dict | None = None, record: dict | None = None,
             extra=None) -> None:
        """Save the state's arrays and its JSON record (model signature, metrics, run
        config, the identity of the prepared data `data`, the callbacks' `record`, a
        checksum per array) at `step`, with `extra` arrays beside them; returns before an
        async write is done."""
        step = int(step)
        if step in self.steps():
            raise JaxtrainError(f"{self.directory} already holds a checkpoint at step "
                                f"{step}; nothing was overwritten")
        metrics = _jsonable(metrics)
        start = time.perf_counter()
        arrays = {"state": state.saveable()}
        if extra is not None:
            arrays["extra"] = extra
        meta = {"step": step, "model": signature, "metrics": metrics, "config": config or {},
                "data": data or {}, "record": record or {},
                "checksums": checksums(arrays),
                "best": {"metric": self.best_metric, "mode": self.best_mode}}
        tracked = metrics if self.best_metric in metrics else None
        items = {k: ocp.args.PyTreeSave(v) for k, v in arrays.items()}
        self._mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items),
                        metrics=tracked, force=True)
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

    def best_step(self, metric: str | None = None, mode: str | None = None,
                  among=None) -> int:
        """The step with the best `metric` (default: the one this folder was saved with),
        among the steps `among` (default: all)."""
        self._settle()
        records = {}
        for step in self.steps() if among is None else among:
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
        reason = str(err) if isinstance(err, DamagedCheckpoint) else _first_line(err)
        if not fallback:
            raise JaxtrainError(f"checkpoint {where} is damaged ({reason})")
        moved = "" if self.read_only else f"; moved it to {self._move_aside(step)}"
        warnings.warn(f"skipping damaged checkpoint {where} ({reason}){moved}; falling back "
                      "to the previous one", stacklevel=3)

    def _move_aside(self, step: int) -> Path:
        """Rename a damaged step's folder to `STEP.damaged` (Orbax then no longer lists it,
        so the step is saved afresh), keeping the bytes for a post-mortem."""
        source = self.directory / str(step)
        target, n = self.directory / f"{step}.damaged", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.damaged-{n}"
        os.replace(source, target)
        self._mngr.reload()
        return target

    def _verify(self, step: int, record: dict, arrays: dict) -> None:
        bad = mismatched(record.get("checksums", {}), arrays)
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise DamagedCheckpoint(f"checksum mismatch in {', '.join(bad[:3])}{more}")

    def _read(self, step: int, target: dict, record: dict | None = None) -> dict:
        """The arrays of `target` (`{item: tree of ShapeDtypeStructs}`, a subset of what
        was saved) at `step`, verified against their checksums."""
        record = self.meta(step) if record is None else record
        restored = self._mngr.restore(step, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(
                item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
                partial_restore=True)
            for item, tree in target.items()}))
        arrays = {item: restored[item] for item in target}
        self._verify(step, record, arrays)
        return arrays

    def restore(self, like, signature: dict | None = None, step: int | str | None = None,
                items=None):
        """`like` (a TrainState) with the saved arrays of `step`, placed with `like`'s
        shardings, so a state saved on one mesh restores onto another.

        `step`: None or 'latest' (the newest intact step; damaged newer ones are skipped
        with a warning), 'best', or a step number. `items`: which parts of the state to
        restore (say `['params']`); the rest keep `like`'s values.
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
                restored = self._read(candidate, {"state": target}, record)["state"]
            except Exception as err:
                self._unusable(candidate, err, fallback)
                continue
            self.restored_step = candidate
            return like.with_saved({**wanted, **restored})
        raise JaxtrainError(f"no readable checkpoint in {self.directory} "
                            f"(tried steps {candidates})")

    def restore_arrays(self, step: int | str | None = None, items=None) -> dict:
        """The saved arrays (of `items`, default all) as nested dicts on the default
        device; needs no target and works whatever mesh the checkpoint was saved on.
        Like `restore`, the latest step falls back past damaged ones."""
        self._settle()
        candidates, fallback = self._candidates(step)
        for candidate in candidates:
            try:
                tree = self._mngr.item_metadata(candidate)["state"].tree
                target = {k: _on_default_device(v) for k, v in tree.items()
                          if items is None or k in items}
                arrays = self._read(candidate, {"state": target})["state"]
            except Exception as err:
                self._unusable(candidate, err, fallback)
                continue
            self.restored_step = candidate
            return arrays
        raise JaxtrainError(f"no readable checkpoint in {self.directory} "
                            f"(tried steps {candidates})")

    def restore_extra(self, step: int, like):
        """The `extra` arrays saved with `step`, restored onto `like` (a tree of arrays
        with the same structure, whose shardings they take), or None if none were saved."""
        self._settle()
        if self._mngr.item_metadata(step).get("extra") is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._read(step, {"extra": target})["extra"]

    def verify(self, step: int) -> str | None:
        """Why `step` is damaged (its record or arrays unreadable, or an array not matching
        its checksum), or None when it is intact. Reads every array of the step."""
        self._settle()
        try:
            tree = self._mngr.item_metadata(step)
            target = {k: _on_default_device(tree[k].tree) for k in ("state", "extra")
                      if tree.get(k) is not None}
            self._read(step, target)
        except DamagedCheckpoint as err:
            return str(err)
        except Exception as err:
            return _first_line(err)
        return None

    def close(self) -> None:
        self._mngr.close()


def _on_default_device(tree):
    """Orbax array metadata as ShapeDtypeStructs on the default device (a restore target
    that needs no knowledge of the mesh the arrays were saved from)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        tree)


def check_folder(directory: str | Path, what: str = "checkpoint") -> None:
    """Refuse in one line a `directory` that is not a folder: one that does not exist, or
    a file (a step's file given instead of the folder that holds the step folders)."""
    path = Path(directory)
    if path.is_dir():
        return
    if not path.exists():
        raise JaxtrainError(f"{what} folder {directory} does not exist")
    raise JaxtrainError(f"{what} folder {directory} is a file, not a folder: give the folder "
                        f"that holds the numbered step folders (e.g. OUT/checkpoints)")


def saved_params(directory: str | Path, step: int | None = None,
                 what: str = "checkpoint") -> dict:
    """The params saved in the checkpoint folder `directory` (its latest readable step, or
    `step`), flat by `/`-joined path, on the default device. `what` names the folder in
    the error when it does not exist ("pretrained checkpoint", "teacher checkpoint")."""
    check_folder(directory, what)
    mngr = Manager(directory, read_only=True)
    try:
        return flat_by_path(mngr.restore_arrays(step, items=["params"])["params"])
    finally:
        mngr.close()


def flat_by_path(tree) -> dict:
    """`{path: leaf}` of a tree, paths as `transforms.path_str` writes them."""
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


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
