"""A run's directories: save_dir/models/<name>/<run_id> for checkpoints and save_dir/log/<name>/<run_id> for
logs, claimed atomically so that two runs never share one, and locked while a trainer uses them."""

import fcntl
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import distributed
from .checkpoint import remove_stale_temp_files
from .errors import ConfigError


@dataclass(frozen=True)
class RunPaths:
    checkpoints: Path
    logs: Path
    run_id: str
    lock: int | None = field(default=None, compare=False, repr=False)  # held open for the process's life

    def release(self) -> None:
        """Give up the run directory's lock (the process's end would too)."""
        if self.lock is not None:
            os.close(self.lock)

    @classmethod
    def under(cls, save_dir: str | Path, name: str, run_id: str) -> "RunPaths":
        return cls(Path(save_dir) / "models" / name / run_id, Path(save_dir) / "log" / name / run_id, run_id)


def claim_run_directory(
    save_dir: str,
    name: str,
    run_id: str,
    explicit_run_id: bool = False,
    resumed_from: Path | None = None,
    source: str = "",
) -> RunPaths:
    """Create the run directory and lock it: a timestamp id that another run took gets a suffix (_2, _3, ...);
    an existing directory is only reused by resuming its own checkpoint (`resumed_from`), and never while
    another trainer holds it. Under DDP rank 0 decides and holds the lock; every rank gets its answer."""
    claimed, problem = None, None
    if distributed.is_main():
        try:
            claimed = _claim(save_dir, name, run_id, explicit_run_id, resumed_from, source)
            claimed = RunPaths(
                claimed.checkpoints, claimed.logs, claimed.run_id, lock_run(claimed.checkpoints)
            )
        except ConfigError as error:
            problem = str(error)
    run_id, problem = distributed.broadcast((claimed.run_id if claimed else None, problem))
    if problem:
        raise ConfigError(problem)
    return claimed or RunPaths.under(save_dir, name, run_id)


def _claim(
    save_dir: str, name: str, run_id: str, explicit_run_id: bool, resumed_from: Path | None, source: str
) -> RunPaths:
    run = RunPaths.under(save_dir, name, run_id)
    if resumed_from is not None and resumed_from.parent.resolve() == run.checkpoints.resolve():
        return run
    try:
        run.checkpoints.parent.mkdir(parents=True, exist_ok=True)
        Path(save_dir, "log").mkdir(exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{source}: trainer.save_dir: cannot write under '{save_dir}' "
            f"({error.strerror or error}); choose a writable directory"
        ) from None
    for suffix in itertools.count(2):
        try:
            run.checkpoints.mkdir()
            return run
        except FileExistsError:
            if explicit_run_id:
                raise ConfigError(
                    f"--run-id {run_id}: {run.checkpoints} already exists; choose another id, "
                    f"or continue that run with --resume {run.checkpoints}"
                ) from None
            run = RunPaths.under(save_dir, name, f"{run_id}_{suffix}")


def lock_run(directory: Path) -> int:
    """Lock the run directory for this process (flock: the kernel releases it when the process ends, even by
    kill -9, so no stale lock survives), or refuse naming the trainer that holds it. Temp files a killed
    save left behind are removed once the lock is held."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        holder = _lock_holder(directory)
        raise ConfigError(
            f"{directory}: another trainer is using this run{f' (pid {holder})' if holder else ''}; wait for "
            "it to finish or stop it, or start a separate run"
        ) from None
    remove_stale_temp_files(directory)
    return handle


def _lock_holder(directory: Path) -> int | None:
    """The pid holding a flock on `directory`, from /proc/locks (Linux), if it can be told."""
    inode = os.stat(directory).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return None
