"""SIGTERM and SIGINT as a request to stop at the next safe point (a train loop then saves
a checkpoint and ends) instead of ending the process mid-step. Used by the `Trainer` and
the local SGD loop. On several processes the stop is agreed (`StopSignals.agreed`), so that
all of them save the same step and end."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


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

    def agreed(self, sync_point: bool) -> str | None:
        """The signal to stop for, the same on every process. One process: the one it
        received. Several: a scheduler's signals reach them at different steps, and a
        process that stopped to save alone would leave the others waiting in the next
        step's collectives; so at `sync_point`s (calls that every process makes at the
        same step) they share what they received, one small all-gather, and all stop if
        any did. Between sync points none stops."""
        if jax.process_count() == 1:
            return self.received
        if not sync_point:
            return None
        from jax.experimental import multihost_utils

        mine = signal.Signals[self.received].value if self.received else 0
        codes = np.ravel(multihost_utils.process_allgather(np.int32(mine)))
        first = next((int(c) for c in codes if c), 0)
        return signal.Signals(first).name if first else None
