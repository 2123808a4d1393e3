"""What a training loop writes as it runs (the `Trainer`'s and local SGD's): log.jsonl,
TensorBoard event files and a progress bar, then curves.png and confusion.png at the end.
Written by the main process only."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import JaxtrainError
from .logs import JsonlLogger, TensorBoardLogger, keep_until, plot_history, read_log
from .metrics import plot_confusion
from .progress import Progress


class RunLogs:
    """The records of run `run` going from step `start` to `steps` in `log_dir` (None:
    no files), as the `logging` section's `tensorboard`, `plots` and `progress` say.

    A run resumed from `start` first drops what its log holds past `start` (those steps
    are logged again, so each appears once; TensorBoard purges them too). Its eval
    records are named `RUN/eval`. A plot that cannot be drawn only warns: a finished run
    is not failed for a picture."""

    def __init__(self, log_dir, run: str, start: int, steps: int, *, tensorboard: bool = True,
                 plots: bool = True, progress: bool = True, main: bool = True):
        self.folder = None if log_dir is None or not main else Path(log_dir)
        self.run, self.start, self.plots = run, start, plots
        self.bar = Progress(steps - start, run, enabled=progress and main)
        self.loggers: list = []
        self.written = False  # whether this process logged any record
        if self.folder is None:
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise JaxtrainError(f"log folder {self.folder} is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        keep_until(self.folder / "log.jsonl", {run, f"{run}/eval"}, start)
        self.loggers.append(JsonlLogger(self.folder / "log.jsonl"))
        if tensorboard:
            self.loggers.append(TensorBoardLogger(self.folder / "tensorboard", start))

    def write(self, run: str, step: int, values: dict) -> None:
        for logger in self.loggers:
            logger.log(run, step, values)
        self.written = self.written or bool(self.loggers)

    def progress(self, step: int, shown: dict) -> None:
        """Move the progress bar to `step`, showing `shown` (loss, throughput...)."""
        self.bar.update(step - self.start, shown)

    def close(self, confusion=None, confusion_title: str = "") -> None:
        """Close the files; draw curves.png (every resumed part of the log) if this process
        logged anything, and `confusion` (a matrix) as confusion.png."""
        self.bar.close()
        for logger in self.loggers:
            logger.close()
        if self.folder is None or not self.plots:
            return
        if self.written:
            _draw(lambda path: plot_history(logged(self.folder / "log.jsonl", self.run), path,
                                            title=self.run), self.folder / "curves.png")
        if confusion is not None:
            _draw(lambda path: plot_confusion(confusion, path, title=confusion_title),
                  self.folder / "confusion.png")


def _draw(plot, path: Path) -> None:
    try:
        plot(path)
    except Exception as err:  # a plot is not worth failing a finished run for
        warnings.warn(f"could not draw {path}: {type(err).__name__}: {err}", stacklevel=3)


def logged(path: Path, run: str) -> dict:
    """The train and eval records of `run` in a JSONL log, all resumed parts together
    (a step logged twice, before a crash and after the resume, counts once: the later)."""
    series: dict = {"train": {}, "eval": {}}
    kinds = {run: "train", f"{run}/eval": "eval"}
    for record in read_log(path):
        kind = kinds.get(record.pop("run", None))
        if kind is not None:
            series[kind][record.pop("step")] = record
    return {k: sorted(v.items()) for k, v in series.items()}
