"""What a checkpoint folder holds, step by step: metrics, size on disk, which is best."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import JaxtrainError
from .manager import Manager


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def list_checkpoints(directory: str | Path) -> list[dict]:
    """One row per complete step: `step`, `metrics`, `bytes`, `best` (bool), and
    `error` for a damaged step (its record or arrays unreadable, or an array not matching
    its checksum: every array is read and checked). A damaged step is never the best.
    Reads only; creates nothing. A folder without any complete step is an error, as it is
    for a restore."""
    with Manager(directory, read_only=True) as mngr:
        if not mngr.steps():
            raise JaxtrainError(f"no checkpoint in {directory}")
        rows = []
        for step in mngr.steps():
            row = {"step": step, "metrics": {}, "best": False,
                   "bytes": folder_bytes(mngr.directory / str(step))}
            try:
                row["metrics"] = mngr.meta(step).get("metrics", {})
            except Exception as err:  # a damaged record: list it, say so
                row["error"] = f"damaged: unreadable record ({type(err).__name__})"
            else:
                problem = mngr.verify(step)
                if problem:
                    row["error"] = f"damaged: {problem}"
            rows.append(row)
        intact = [row["step"] for row in rows if "error" not in row]
        try:
            best = mngr.best_step(among=intact) if intact else None
        except ValueError:  # no best metric recorded: nothing to mark
            best = None
    for row in rows:
        row["best"] = row["step"] == best
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_listing(rows: list[dict]) -> str:
    """The rows as a text table; the best step is marked with `*`."""
    lines = [f"{'step':>8}  {'size':>9}  metrics"]
    for row in rows:
        metrics = row.get("error") or " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(row["metrics"].items()))
        mark = " *" if row["best"] else ""
        lines.append(f"{row['step']:>8}  {_size(row['bytes']):>9}  {metrics}{mark}")
    return "\n".join(lines)
