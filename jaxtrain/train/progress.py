"""Progress for long work: a tqdm bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """`update(step, metrics)` after each logged step; `close()` at the end."""

    def __init__(self, total: int, desc: str, enabled: bool = True, lines: int = 5):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=True) if self.tty else None
        self.every = max(1, total // lines)
        self.done = 0
        self.next_line = self.every

    def update(self, step: int, metrics: dict) -> None:
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(shown, refresh=False)
        elif self.enabled and (step >= self.next_line or step == self.total):
            text = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"{self.desc}: step {step}/{self.total} {text}", file=sys.stderr, flush=True)
            self.next_line = step + self.every
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
