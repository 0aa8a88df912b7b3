"""Search hyperparameters: python sweep.py -c sweep.yaml [--storage URL] [--jobs N].

Optuna samples and prunes; each trial is an ordinary train.py run of the base config with the trial's values
as overrides. The study lives in a database (a SQLite file in saved/sweeps/<name>/ unless --storage names
another), so the same command continues an interrupted sweep, and the same command on other machines with one
--storage URL adds workers to it. See the README's Sweeps section for the sweep file.
"""

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Any

from utils.errors import ConfigError, exit_after, without_password


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run or continue a hyperparameter sweep on Optuna.")
    parser.add_argument("-c", "--config", required=True, help="the sweep file (.yaml, .yml or .json)")
    parser.add_argument(
        "--storage",
        help="the study's database URL, shared by every worker (default: sqlite:///<save_dir>/sweeps/<name>/"
        "study.db); e.g. postgresql://user@host/sweeps",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trials side by side, one worker process each")
    parser.add_argument(
        "--devices", help="GPU ids the --jobs workers take in turn, e.g. 0,1,2,3 (default: every visible GPU)"
    )
    parser.add_argument(
        "--launcher",
        default=sys.executable,
        help="what runs each trial's train.py, e.g. 'torchrun --standalone --nproc_per_node 4' "
        f"(default: {sys.executable})",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --jobs' workers
    return parser


def validate_trial(spec: Any) -> Any:
    """A function checking one trial's overrides as train.py would, returning the resulting Config."""
    import builders
    from parse_config import parse_args
    from trainer.options import PROJECT_OPTIONS

    def validate(overrides: list[str]) -> Any:
        return parse_args(["-c", spec.config, *overrides], builders.lookups, project=PROJECT_OPTIONS)[0]

    return validate


def prepare(args: argparse.Namespace) -> tuple[Any, Any, Any, str, Path, Path]:
    """The sweep file checked against the base config, and its study opened (created the first time); only
    then is anything written. ConfigError otherwise."""
    from sweeps.spec import check_against_base, load_sweep

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError('sweep.py needs Optuna: pip install -e ".[sweep]"')
    if args.jobs < 1:
        raise ConfigError(f"--jobs: {args.jobs}; give 1 or more workers")
    spec = load_sweep(args.config)
    base = check_against_base(spec, validate_trial(spec))
    save_dir = Path(base.trainer["save_dir"])
    sweep_dir = save_dir / "sweeps" / spec.name
    from parse_config.loading import load_config_file
    from sweeps.study import locked, open_study, sqlite_url, storage_for

    shown = without_password(args.storage or "")
    if args.storage:  # reachable before anything is written (a connection only: no tables yet)
        _database(lambda: _connect(args.storage), f"--storage {shown}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    url = args.storage or sqlite_url(sweep_dir)
    with locked(sweep_dir / "claim.lock"):  # workers starting together create the tables once
        storage = _database(lambda: storage_for(url), shown or url)
        study = _database(lambda: open_study(spec, storage, load_config_file(spec.config)), shown or url)
    return spec, study, storage, url, sweep_dir, save_dir


def _connect(url: str) -> None:
    import sqlalchemy

    sqlalchemy.create_engine(url).connect().close()


def _database(action: Any, where: str) -> Any:
    """`action()`, with a database that cannot be reached or has no driver as one line."""
    import sqlalchemy.exc

    try:
        return action()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ImportError) as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"{where}: cannot open the study's database ({first_line})") from None


def gpu_ids(args: argparse.Namespace) -> list[str]:
    if args.devices:
        return [device.strip() for device in args.devices.split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 the sweep (or this worker's share) is done, 1 a trial was lost to a signal from
    elsewhere, 2 bad input (nothing run), 128+N stopped by signal N: the same command continues."""
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    try:
        spec, study, storage, url, sweep_dir, save_dir = prepare(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from sweeps.ledger import summary, write_ledger
    from sweeps.study import running_elsewhere
    from sweeps.trials import Worker, run_jobs

    if args.jobs > 1:
        worker_args = ["-c", args.config, "--launcher", args.launcher]
        worker_args += ["--storage", args.storage] if args.storage else []
        status = run_jobs(args.jobs, gpu_ids(args), worker_args)
    else:
        launcher = shlex.split(args.launcher)
        status = Worker(spec, study, storage, url, sweep_dir, save_dir, launcher).work()
    if args.worker:
        return status
    write_ledger(study, spec, sweep_dir, save_dir)
    if status >= 128:
        print(f"Sweep stopped; to continue it: python sweep.py {shlex.join(argv)}", file=sys.stderr)
        return status
    running = running_elsewhere(study)
    if running:
        print(f"{running} trial(s) still running in other workers (or interrupted there)")
    text = summary(study, spec, sweep_dir, save_dir)
    (sweep_dir / "summary.txt").write_text(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    exit_after(main())
