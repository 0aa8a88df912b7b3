"""Running trials: each one `train.py` in a child process (an ordinary run: its own run directory,
config.yaml, TensorBoard and checkpoints), and the worker loop that takes trials until the sweep has its
total.

A signal to the worker (Ctrl-C, SIGTERM) goes on to the trial, which saves and stops; the trial stays RUNNING
in the study, and the same command later resumes it from its checkpoint. The child runs in its own session
(a terminal's Ctrl-C reaches it once, through the worker) and is told to stop if the worker dies (kill -9).
"""

import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from utils.run_directory import RunPaths

from .ledger import trial_run, write_ledger
from .reporter import environment
from .spec import SweepSpec
from .study import Claim, claim_next

TRAIN = Path(__file__).resolve().parent.parent / "train.py"


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM when the worker dies, however it dies (Linux prctl
    PR_SET_PDEATHSIG); the trial then saves and stops like after any SIGTERM."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Worker:
    """Takes trials from the study one at a time and runs each to its end."""

    def __init__(
        self,
        spec: SweepSpec,
        study: Any,
        storage: Any,
        url: str,
        sweep_dir: Path,
        save_dir: Path,
        launcher: list[str],
    ):
        """`storage` is the study's (the trials' reports are read through it); `url` goes to each trial."""
        self.spec, self.study, self.storage, self.url = spec, study, storage, url
        self.study_id = self.storage.get_study_id_from_name(spec.name)
        self.sweep_dir, self.save_dir, self.launcher = sweep_dir, save_dir, launcher
        self.stop_signal: int | None = None
        self.child: subprocess.Popen | None = None

    def work(self) -> int:
        """Exit status: 0 when nothing is left for this worker, 1 when a trial was lost to a signal this
        worker did not get, 2 when a trial's run was refused, 128+N when stopped by signal N."""
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._forward)
        while self.stop_signal is None:
            claim = claim_next(self.study, self.spec, self.sweep_dir)
            if claim is None:
                return 0
            try:
                write_ledger(self.study, self.spec, self.sweep_dir, self.save_dir)
                status = self._run(claim)
            finally:
                claim.release()
            write_ledger(self.study, self.spec, self.sweep_dir, self.save_dir)
            if status is not None:
                return status
        return 128 + self.stop_signal

    def _forward(self, number: int, frame: Any) -> None:
        self.stop_signal = number
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(number)

    def _run(self, claim: Claim) -> int | None:
        """Run the claimed trial and tell the study how it ended; an exit status when the worker must stop."""
        from optuna.trial import TrialState

        run = trial_run(self.save_dir, self.spec, claim.number)
        attrs = self._user_attrs(claim.number)
        if claim.resume and "pruned_at" in attrs:  # pruned, but the worker died before saying so
            self.study.tell(claim.number, state=TrialState.PRUNED)
            return None
        if claim.resume and run.checkpoints.exists():
            self._wait_for(run, claim.number)
        if self.stop_signal is not None:  # came while claiming: the trial waits, RUNNING, for a worker
            return 128 + self.stop_signal
        command = self._command(claim, run)
        print(self._announce(claim, run), flush=True)
        env = {**os.environ, **environment(self.url, self.spec.name, claim.number, self.spec.pruner)}
        self.child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_stop_with_parent)
        status = self.child.wait()
        self.child = None
        return self._tell(claim, status)

    @staticmethod
    def _wait_for(run: RunPaths, number: int) -> None:
        """A trial whose worker was killed may still be saving (its run told to stop, not killed): wait until
        it lets go of its run directory."""
        handle = os.open(run.checkpoints, os.O_RDONLY)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"Trial {number}: waiting for its interrupted run to finish saving", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        finally:
            os.close(handle)

    def _user_attrs(self, number: int) -> dict[str, Any]:
        """What the trial's run reported (best value and epoch, pruned_at), read fresh from the storage."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self.storage.get_trial(trial_id).user_attrs

    def _command(self, claim: Claim, run: RunPaths) -> list[str]:
        """The trial's train.py command: the base config with the trial's overrides, resuming its newest
        checkpoint when it was interrupted (the types it names come from the user's config, as at first)."""
        start = ["--run-id", run.run_id]
        if claim.resume and any(run.checkpoints.glob("*.pth")):
            start = ["--resume", str(run.checkpoints)]
        elif claim.resume:  # interrupted before its first checkpoint: keep what it wrote, begin it again
            self._move_aside(run)
        overrides = self.spec.overrides(claim.params)
        return [*self.launcher, str(TRAIN), "-c", self.spec.config, *start, *overrides]

    def _move_aside(self, run: RunPaths) -> None:
        for kind, directory in (("models", run.checkpoints), ("log", run.logs)):
            if directory.exists():
                target = self.sweep_dir / "interrupted" / kind / run.run_id
                for suffix in range(2, 1000):
                    if not target.exists():
                        break
                    target = target.with_name(f"{run.run_id}_{suffix}")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(directory, target)

    def _announce(self, claim: Claim, run: RunPaths) -> str:
        if claim.resume:
            return f"Trial {claim.number}: resuming the interrupted trial in {run.checkpoints}"
        values = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in claim.params.items())  # fmt: skip
        return f"Trial {claim.number} of {self.spec.trials}: {values} -> {run.checkpoints}"

    def _tell(self, claim: Claim, status: int) -> int | None:
        from optuna.trial import TrialState

        if status < 0 or status >= 128:  # stopped by a signal: the trial stays RUNNING, to be resumed
            if self.stop_signal is not None:
                return 128 + self.stop_signal
            print(f"Trial {claim.number} was stopped by signal {abs(status) % 128} from elsewhere; run the "
                  "same command to resume it", file=sys.stderr)  # fmt: skip
            return 1
        attrs = self._user_attrs(claim.number)
        metric = " ".join(self.spec.objective)
        if status == 0 and "pruned_at" in attrs:
            self.study.tell(claim.number, state=TrialState.PRUNED)
            print(f"Trial {claim.number} PRUNED at epoch {attrs['pruned_at']} ({metric} {attrs['best']:.6g})")
        elif status == 0 and "best" in attrs:
            self.study.tell(claim.number, attrs["best"])
            best, epoch = attrs["best"], attrs["best_epoch"]
            print(f"Trial {claim.number} COMPLETE: {metric} {best:.6g} at epoch {epoch}")
        else:
            self.study.tell(claim.number, state=TrialState.FAIL)
            why = "its run was refused" if status == 2 else f"exit status {status}"
            print(f"Trial {claim.number} FAILED ({why}; its info.log has the details)", file=sys.stderr)
            if status == 2:
                return 2
        return None


def run_jobs(count: int, devices: list[str], argv: list[str]) -> int:
    """`count` workers side by side, each its own `sweep.py` process on one device (CUDA_VISIBLE_DEVICES) when
    devices are given; signals go on to all of them. The highest exit status wins."""
    workers = []
    for index in range(count):
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
        command = [sys.executable, str(TRAIN.with_name("sweep.py")), *argv, "--worker"]
        worker = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_stop_with_parent)
        workers.append(worker)

    def forward(number: int, frame: Any) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(number)

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, forward)
    statuses = [worker.wait() for worker in workers]
    return max((status if status >= 0 else 128 - status for status in statuses), default=0)
