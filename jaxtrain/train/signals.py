"""SIGTERM and SIGINT as a request to stop at the next safe point (a train loop then saves
a checkpoint and ends) instead of ending the process mid-step. Used by the `Trainer` and
the local SGD loop."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Between `install` and `restore` (on the main thread, when `enabled`), SIGTERM and
    SIGINT only set `received` (the signal's name); the previous handlers come back on
    `restore`."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.received, self._previous = enabled, None, {}

    def install(self) -> None:
        self.received = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler)
                              for s in (signal.SIGTERM, signal.SIGINT)}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
