"""The Optuna study behind a sweep: where it is stored, that it is still the same sweep, and which trial a
worker takes next.

Claims are serialised by a lock file in the sweep's directory, so workers sharing that directory (one machine,
or a shared filesystem) never take the same trial or run past the requested total. A worker holds a lock on
`locks/trial_N.lock` while trial N runs; a RUNNING trial whose lock anyone can take was interrupted (its
worker died: the kernel drops flock locks even on kill -9), and the next worker resumes it.
"""

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from utils.errors import ConfigError

from .spec import PRUNERS, SAMPLERS, SweepSpec

DEFINITION = "torchkiln_sweep"  # the study's user attribute holding what the sweep was begun with


@dataclass
class Claim:
    """A trial this worker now runs: new (`resume` False) or interrupted; `lock` is held until released."""

    number: int
    params: dict[str, Any]
    resume: bool
    lock: int

    def release(self) -> None:
        os.close(self.lock)


def sqlite_url(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir.resolve() / 'study.db'}"


def storage_for(url: str) -> Any:
    """An RDB storage; SQLite waits for a busy database (several workers write it) instead of failing."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    wait = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=wait)


def make_pruner(pruner: tuple[str, dict]) -> Any:
    import optuna

    kind, args = pruner
    return getattr(optuna.pruners, PRUNERS[kind])(**args)


def make_sampler(spec: SweepSpec, seed: int) -> Any:
    """A fresh sampler for each new trial, seeded by the trial's position in the study: the draws are the
    same whether the sweep ran in one go or was continued, and two workers never share a random stream."""
    import optuna

    kind, args = spec.sampler
    args = {"seed": seed, **args} if "seed" not in args else {**args, "seed": args["seed"] + seed}
    if kind == "grid":

        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, *_: Any) -> None:
                """The sweep's total ends it: GridSampler would call Study.stop, which raises outside
                Study.optimize (trials here are asked for and told)."""

        return Grid({key: list(param.choices) for key, param in spec.space.items()}, **args)
    return getattr(optuna.samplers, SAMPLERS[kind])(**args)


def open_study(spec: SweepSpec, storage: Any, base_data: dict) -> Any:
    """The sweep's study, created on first use with what it was begun with; refused when the sweep file or
    the base config changed since (the number of trials may grow)."""
    import optuna

    definition = json.loads(json.dumps({**spec.definition(), "base_config": base_data}, default=str))
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        direction=spec.direction,
        pruner=make_pruner(spec.pruner),
        load_if_exists=True,
    )
    began = study.user_attrs.get(DEFINITION)
    if began is None:
        study.set_user_attr(DEFINITION, definition)
        for params in spec.first:
            study.enqueue_trial(params)
    elif began != definition:
        raise ConfigError(f"{spec.path}: {what_changed(began, definition, spec)}")
    return study


def what_changed(began: dict, now: dict, spec: SweepSpec) -> str:
    """One line naming each key path whose value differs from when the sweep began."""
    old, new = _flat(began), _flat(now)
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            where = (
                f"{spec.config} {key.removeprefix('base_config.')}" if key.startswith("base_config.") else key
            )
            changes.append(f"{where}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    return (
        f"sweep '{spec.name}' began with another definition ({shown}); restore it to continue the sweep, "
        "or give this one a new name"
    )


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by key path (a searched key path such as `optimizer.args.lr` is one part of it)."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@contextmanager
def locked(path: Path) -> Iterator[None]:
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _try_lock(path: Path) -> int | None:
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        os.close(handle)
        return None


def claim_next(study: Any, spec: SweepSpec, sweep_dir: Path) -> Claim | None:
    """The trial this worker runs next: an interrupted one first (resumed, same number), else a new one while
    fewer than `trials` were begun; None when there is nothing left for this worker."""
    from optuna.trial import TrialState

    locks = sweep_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with locked(sweep_dir / "claim.lock"):
        trials = study.get_trials(deepcopy=False)
        for trial in trials:
            lock_file = locks / f"trial_{trial.number}.lock"
            if trial.state == TrialState.RUNNING and lock_file.exists():  # else another machine's
                handle = _try_lock(lock_file)
                if handle is not None:
                    return Claim(trial.number, dict(trial.params), True, handle)
        begun = sum(trial.state != TrialState.WAITING for trial in trials)
        if begun >= spec.trials:
            return None
        study.sampler = make_sampler(spec, seed=begun)
        trial = study.ask()
        params = {key: param.suggest(trial) for key, param in spec.space.items()}
        handle = _try_lock(locks / f"trial_{trial.number}.lock")  # a fresh number: nobody holds it
        return Claim(trial.number, params, False, handle)


def running_elsewhere(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(trial.state == TrialState.RUNNING for trial in study.get_trials(deepcopy=False))
