"""Preemption: a cluster's SIGTERM (or a Ctrl-C) saves a checkpoint instead of losing the epoch.

:class:`StopSignal` only records the signal; the engine looks at it between steps, on all ranks together,
saves ``last.pt`` and raises :class:`Preempted`, so rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from hiervision.training.steps import TrainingError

__all__ = ["Preempted", "StopSignal"]


class Preempted(TrainingError):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run stopped; rerunning the command resumes it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """Catches SIGTERM/SIGINT while training, so a cluster's preemption saves a checkpoint instead of losing the epoch.

    The handler only records the signal; the loop looks at :attr:`requested` between steps (all ranks
    together) and stops cleanly. Outside the main thread signals cannot be caught and this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
