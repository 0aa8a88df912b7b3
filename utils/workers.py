"""DataLoader worker processes: shielded from the stop signals, answering where they are when asked, and
dying with one clear error at a line where the trainer expects errors."""

import contextlib
import faulthandler
import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_sharer
import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType, TracebackType
from typing import Any, Callable, Iterable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal went away
WHERE_ARE_YOU = signal.SIGUSR1  # asks a shielded DataLoader worker for its stack
ANSWER_PAUSE_S = 0.2  # between two workers' answers to a first Ctrl-C
DYING_WORKER_WAIT_S = 30.0  # for the worker whose batch handoff broke to finish exiting


def shield_workers(loader: Any) -> None:
    """Make a DataLoader's worker processes ignore the stop signals. Slurm, systemd and a terminal's Ctrl-C
    signal the whole process group: workers that died of it would fail the batch the trainer is finishing;
    shielded, they keep serving until the trainer has saved, and end with it."""
    if loader is not None and getattr(loader, "num_workers", 0) > 0:
        loader.worker_init_fn = functools.partial(_shield_worker, loader.worker_init_fn)


def shielded_iter(loader: Iterable) -> Iterator:
    """`iter(loader)`, which forks a DataLoader's workers, with the stop signals blocked meanwhile. The
    workers inherit the block, so a signal arriving before a worker has ignored it (torch's worker setup
    installs its own SIGTERM handler first) stays pending and is then discarded; here it is delivered right
    after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        iterator = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _check_workers_when_batches_are_due()
    return _WorkerDeaths(iterator)


class Shielded:
    """An iterable over `loader` whose iterators start as shielded_iter's do (for validation loops)."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self) -> Iterator:
        return shielded_iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class _WorkerDeaths:
    """A DataLoader iterator on which a worker that died while handing over a batch reads as the worker
    death it is. The worker's tensors come through multiprocessing's resource sharer, a connection to the
    worker: when the worker dies mid-handoff, the connection breaks before the process has exited, torch
    finds every worker alive and passes the bare ConnectionResetError on."""

    def __init__(self, iterator: Iterator):
        self.iterator = iterator
        self.children = multiprocessing.active_children()  # its workers among them, listed while alive

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except (ConnectionError, EOFError) as error:
            if not _raised_in_handoff(error.__traceback__):
                raise
            dead = _first_to_exit(self.children, DYING_WORKER_WAIT_S)
            if dead is None:
                raise
            raise RuntimeError(
                f"DataLoader worker (pid(s) {dead.pid}) exited unexpectedly with exit code {dead.exitcode}"
            ) from error


def _raised_in_handoff(trace: TracebackType | None) -> bool:
    handoff = multiprocessing.resource_sharer.__file__
    return any(frame.filename == handoff for frame in traceback.extract_tb(trace))


def _first_to_exit(children: list[multiprocessing.Process], timeout: float) -> multiprocessing.Process | None:
    ready = multiprocessing.connection.wait([child.sentinel for child in children], timeout)
    dead = [child for child in children if child.sentinel in ready]
    for child in dead:
        child.join()
    return dead[0] if dead else None


class _NoRaiseInHandler:
    """torch's SIGCHLD handler raises "DataLoader worker (pid N) exited unexpectedly" on whatever line the
    main thread is at: inside a checkpoint write, a log call, or the handling of the error that the death
    caused first (then the user gets a traceback instead of one line, a cleanup is skipped, and the exit
    can hang). Wrapped, it raises nothing there; torch's own check finds the dead worker when its batch is
    due (within the loader's 5 s status interval), inside `next(iterator)`."""

    def __init__(self, handler: Callable[[int, FrameType | None], Any]):
        self.handler = handler

    def __call__(self, number: int, frame: FrameType | None) -> None:
        try:
            self.handler(number, frame)
        except RuntimeError as error:
            if "DataLoader worker" not in str(error):
                raise


def _check_workers_when_batches_are_due() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # torch sets its handler from the main thread only
    handler = signal.getsignal(signal.SIGCHLD)
    if callable(handler) and not isinstance(handler, _NoRaiseInHandler):
        signal.signal(signal.SIGCHLD, _NoRaiseInHandler(handler))


def _shield_worker(then: Callable[[int], None] | None, worker_id: int) -> None:
    sys.excepthook = functools.partial(_quiet_handoff_errors, sys.excepthook)
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


def _quiet_handoff_errors(
    previous: Callable[..., Any], kind: type[BaseException], error: BaseException, trace: TracebackType | None
) -> None:
    """The resource sharer's thread reports its errors through sys.excepthook. When the training process
    stops mid-handoff (another worker died, a kill) the connection breaks: the training process says why
    itself, so a worker does not add a traceback."""
    if issubclass(kind, (ConnectionError, EOFError)) and _raised_in_handoff(trace):
        return
    previous(kind, error, trace)


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


def ask_workers_where_they_are() -> None:
    """Each DataLoader worker's stack and the batch it is loading, on stderr, asked from a thread so that the
    step being finished does not wait."""
    children = [child.pid for child in multiprocessing.active_children()]
    threading.Thread(target=_ask_one_at_a_time, args=(children,), daemon=True).start()


def _ask_one_at_a_time(pids: list[int]) -> None:
    """A worker writes its stack in many small writes: asked together, the workers' answers would interleave
    mid-line on the shared stderr. A pause between questions keeps them apart."""
    for index, pid in enumerate(pids):
        if index:
            time.sleep(ANSWER_PAUSE_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, WHERE_ARE_YOU)
