"""Run records: a JSONL log and PNG curves."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSONL log. A line that is not a JSON object (the partial last line a
    killed run leaves) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def keep_until(path: str | Path, runs, step: int) -> None:
    """Drop from the log at `path` the records of `runs` after `step` and any partial line:
    a run resumed from the checkpoint of `step` logs those steps again, so each logged step
    appears once. Rewrites the file (atomically) only when there is something to drop."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    records = read_log(path)
    kept = [r for r in records if not (r.get("run") in runs and r.get("step", 0) > step)]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class JsonlLogger:
    """Appends one JSON object per line; every record carries its `run` name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a")

    def log(self, run: str, step: int, metrics: dict) -> None:
        record = {"run": run, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first
    use: plotting is optional work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig`, write it as a PNG at `path` (its folder made if needed), close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path,
                ylabel: str = "training loss", title: str = "", log_scale: bool = True) -> Path:
    """One line per run of (step, value) points, saved as a PNG (losses on a log axis,
    bounded metrics such as accuracy with `log_scale=False`); markers on a line of 30
    points or fewer, so that a run with one evaluation still shows."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name, marker="o" if len(points) <= 30 else None,
                    ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


class TensorBoardLogger:
    """Scalars to TensorBoard event files (tensorboardX), one tag per `run/metric`.

    A run that continues from `start_step` (a resume) writes a new event file that begins
    with TensorBoard's purge marker for the steps after it (tensorboardX's `purge_step`):
    TensorBoard then drops what an earlier, interrupted process logged past that step, so
    each step shows once, as in the JSONL log. Files are named in the order they are
    written (nanoseconds): tensorboardX's own names change once a second, and a second
    writer within it would replace the first's file."""

    def __init__(self, logdir: str | Path, start_step: int = 0):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1,
                                    filename_suffix=f".{time.time_ns():020d}")

    def log(self, run: str, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{run}/{name}", float(value), int(step))

    def close(self) -> None:
        self.writer.close()


def plot_history(series: dict[str, list[tuple[int, dict]]], path: str | Path,
                 title: str = "") -> Path:
    """One panel per metric name, one line per series (`train`, `eval`, ...), as a PNG."""
    plt = pyplot()

    names = sorted({k for records in series.values() for _, m in records for k in m},
                   key=lambda k: (k != "loss", k))
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for label, records in series.items():
            points = [(s, m[name]) for s, m in records if name in m]
            if points:
                ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 30
                        else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=110)
