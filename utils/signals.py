"""Stop on SIGINT/SIGTERM/SIGHUP at a safe point instead of dying mid-step."""

import contextlib
import faulthandler
import functools
import multiprocessing
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal went away
WHERE_ARE_YOU = signal.SIGUSR1  # asks a shielded DataLoader worker for its stack


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


def shield_workers(loader: Any) -> None:
    """Make a DataLoader's worker processes ignore the stop signals. Slurm, systemd and a terminal's Ctrl-C
    signal the whole process group: workers that died of it would fail the batch the trainer is finishing;
    shielded, they keep serving until the trainer has saved, and end with it."""
    if loader is not None and getattr(loader, "num_workers", 0) > 0:
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)


def shielded_iter(loader: Iterable) -> Iterator:
    """`iter(loader)`, which forks a DataLoader's workers, with the stop signals blocked meanwhile. The
    workers inherit the block, so a signal arriving before a worker has ignored it (torch's worker setup
    installs its own SIGTERM handler first) stays pending and is then discarded; here it is delivered right
    after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Shielded:
    """An iterable over `loader` whose iterators start as shielded_iter's do (for validation loops)."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self) -> Iterator:
        return shielded_iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _ignore_stop_signals(then: Callable[[int], None] | None, worker_id: int) -> None:
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # what was pending is ignored now
    try:  # a worker's stack at once (faulthandler answers inside C code too), then which batch it loads
        signal.signal(WHERE_ARE_YOU, _say_which_batch)
        faulthandler.register(WHERE_ARE_YOU, file=sys.__stderr__, all_threads=False, chain=True)
    # no stderr file descriptor: the question is ignored rather than fatal (SIGUSR1's default)
    except (AttributeError, OSError, ValueError):
        signal.signal(WHERE_ARE_YOU, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def _say_which_batch(number: int, frame: FrameType | None) -> None:
    """A worker's second answer: the batch it is loading, which torch's worker loop holds as `idx` (the
    batch's number in this pass of the iterator) and `index` (its sample indices), and the sample that the
    innermost `__getitem__` is on. Silent while the worker waits for work."""
    names, sample = [], None
    while frame is not None and frame.f_code.co_name != "_worker_loop":
        code = frame.f_code
        if code.co_name == "__getitem__" and code.co_argcount > 1 and sample is None:
            sample = frame.f_locals.get(code.co_varnames[1])
        names.append(code.co_name)
        frame = frame.f_back
    if frame is None or "fetch" not in names:
        return
    batch, keys = frame.f_locals.get("idx"), frame.f_locals.get("index")
    samples = [key[1] if isinstance(key, tuple) else key for key in keys] if isinstance(keys, list) else []
    shown = ", ".join(map(str, samples[:64])) + (", ..." if len(samples) > 64 else "")
    now = f" (now sample {sample})" if sample is not None else ""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.__stderr__.write(
            f"DataLoader worker pid {os.getpid()} is loading batch {batch}{now}: [{shown}]\n"
        )
        sys.__stderr__.flush()


def show_where_processes_are() -> None:
    """The Python stack of this process's main thread and of each DataLoader worker with the batch it is
    loading (where a hung `__getitem__` waits, and on which samples), on stderr: what a first Ctrl-C shows of
    a step that does not finish."""
    with contextlib.suppress(
        AttributeError, OSError, ValueError
    ):  # no stderr file descriptor: no stack to show
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=False)
    for child in multiprocessing.active_children():
        os.kill(child.pid, WHERE_ARE_YOU)
