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
    """Runs save jobs on a thread, one at a time and in order, so that a hard link to a file or a deletion
    comes after the write it depends on. `submit` first waits for the job before it (memory holds at most
    one snapshot being written); a job's error (a full disk) is raised by the next `submit` or `wait`, in
    the training thread. `in_background=False` runs each job on the live state before `submit` returns."""

    def __init__(self, in_background: bool = True):
        self.in_background = in_background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[..., None], state: dict, *args: Any) -> None:
        """Run `job(state, *args)`; in the background on a snapshot of `state`."""
        self.wait()
        if not self.in_background:
            job(state, *args)
            return
        work = (job, snapshot(state), *args)
        self._thread = threading.Thread(target=self._run, args=work, name="checkpoint-save", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[..., None], *args: Any) -> None:
        try:
            job(*args)
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
