"""Run records: a JSONL log and PNG curves."""

from __future__ import annotations

import json
from pathlib import Path


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


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path,
                ylabel: str = "training loss", title: str = "") -> Path:
    """One line per run of (step, value) points, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
