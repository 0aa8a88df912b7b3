"""Stop on SIGINT/SIGTERM/SIGHUP at a safe point instead of dying mid-step."""

import os
import signal
import threading
from types import FrameType


class StopRequest:
    """While active, the first SIGINT/SIGTERM is only noted, so training can finish its step and save;
    a second one kills the process at once (atomic saves keep every checkpoint file whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal went away

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        self.signal = number

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""
