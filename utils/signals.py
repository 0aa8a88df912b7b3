"""Stop on SIGINT/SIGTERM/SIGHUP at a safe point instead of dying mid-step."""

import contextlib
import faulthandler
import os
import signal
import sys
import threading
from types import FrameType

from utils.workers import STOP_SIGNALS, ask_workers_where_they_are


class StopRequest:
    """While active, a stop signal is only noted, so training can finish its step and save. A second Ctrl-C
    kills the process at once (atomic saves keep every checkpoint file whole); a repeated SIGTERM or SIGHUP
    does not, since launchers repeat them (a signal to the process group, then torchrun's forwarded one) and
    end a process that outstays its grace with SIGKILL themselves."""

    SIGNALS = STOP_SIGNALS

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
        if self.signal is not None and number == signal.SIGINT:
            os.write(2, b"\nStopped at once by a second Ctrl-C; the last saved checkpoint is kept\n")
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        if self.signal is None and number == signal.SIGINT:  # os.write: safe inside a signal handler
            os.write(
                2,
                b"\nCtrl-C: finishing the current step, then saving (Ctrl-C again stops at once). "
                b"Where each process is now:\n",
            )
            show_where_processes_are()
        self.signal = self.signal or number

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


def show_where_processes_are() -> None:
    """The Python stack of this process's main thread and of each DataLoader worker with the batch it is
    loading (where a hung `__getitem__` waits, and on which samples), on stderr: what a first Ctrl-C shows of
    a step that does not finish."""
    with contextlib.suppress(
        AttributeError, OSError, ValueError
    ):  # no stderr file descriptor: no stack to show
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=False)
    ask_workers_where_they_are()
