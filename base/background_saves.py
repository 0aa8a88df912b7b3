"""Checkpoint files written while training goes on: hashing, serializing and syncing a file takes
milliseconds for a small model and seconds for a large one, time the next steps need not wait for."""

import threading
from typing import Any, Callable

import torch


def snapshot(state: Any) -> Any:
    """A copy of `state` whose tensors are CPU copies: the training thread keeps updating the model's and the
    optimizer's tensors in place while a background thread writes the copy."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if type(state) in (list, tuple):
        return type(state)(snapshot(value) for value in state)
    return state


class BackgroundSaves:
    """Runs save jobs one at a time and in order, so that a hard link to a file or a deletion comes after the
    write it depends on. A job does a save's CPU work (serializing) and returns what is left, which only
    waits on the disk (fsync, renames, deletions), or None. In the background a thread runs both, on a
    snapshot of the state; otherwise the job runs on the live state before `submit` returns, and only what
    it leaves goes to the thread: an fsync takes no core from training, yet it may take milliseconds. `submit`
    first waits for the job before it (memory holds at most one snapshot being written); a job's error (a full
    disk) is raised by the next `submit` or `wait`, in the training thread."""

    def __init__(self, in_background: bool = True):
        self.in_background = in_background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[..., Callable[[], None] | None], state: dict, *args: Any) -> None:
        """Run `job(state, *args)` and what it returns; in the background on a snapshot of `state`."""
        self.wait()
        if self.in_background:
            self._start(_then_rest, job, snapshot(state), *args)
            return
        rest = job(state, *args)
        if rest is not None:
            self._start(rest)

    def _start(self, work: Callable[..., None], *args: Any) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(work, *args), name="checkpoint-save", daemon=True
        )
        self._thread.start()

    def _run(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except BaseException as error:  # handed to the training thread, which reports it
            self._error = error

    def wait(self) -> None:
        """Return when every submitted job is done; raise the error of one that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _then_rest(job: Callable[..., Callable[[], None] | None], *args: Any) -> None:
    rest = job(*args)
    if rest is not None:
        rest()
