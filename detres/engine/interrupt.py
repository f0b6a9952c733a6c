"""Ctrl-C during training: the first asks the loop to stop after the step it is in (the loop
then writes a checkpoint of that iteration); the second ends the process at once.

Under torchrun the request travels in the loop's per-iteration all-reduce, so every rank stops
after the same step whichever ranks saw the signal.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after a checkpoint of the last finished iteration."""

    def __init__(self, iteration: int, checkpoint: str | None) -> None:
        saved = f"saved {checkpoint}; " if checkpoint else ""
        super().__init__(f"interrupted at iteration {iteration}; {saved}continue with --resume")
        self.iteration, self.checkpoint = iteration, checkpoint


class StopOnInterrupt:
    """Within ``with``: SIGINT sets :attr:`requested` instead of raising; a second SIGINT
    raises KeyboardInterrupt as usual. Outside the main thread (where Python delivers no
    signals) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)   # the second one ends at once

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
