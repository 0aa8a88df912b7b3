"""A run's directories: save_dir/models/<name>/<run_id> for checkpoints and save_dir/log/<name>/<run_id> for
logs, claimed atomically so that two runs never share one."""

import itertools
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .errors import ConfigError


@dataclass(frozen=True)
class RunPaths:
    checkpoints: Path
    logs: Path
    run_id: str

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
    """Create the run directory: a timestamp id that another run took gets a suffix (_2, _3, ...); an
    existing directory is only reused by resuming its own checkpoint (`resumed_from`). Under DDP rank 0
    decides and every rank gets its answer."""
    claimed, problem = None, None
    if distributed.is_main():
        try:
            claimed = _claim(save_dir, name, run_id, explicit_run_id, resumed_from, source)
        except ConfigError as error:
            problem = str(error)
    claimed, problem = distributed.broadcast((claimed, problem))
    if problem:
        raise ConfigError(problem)
    return claimed


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
