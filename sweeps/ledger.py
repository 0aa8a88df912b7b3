"""What a sweep has done, for people: trials.csv kept current (written whole, then renamed into place, so a
reader never sees half a file), and the summary at the end with the commands that retrain or test the best
trial."""

import csv
import io
import os
from pathlib import Path
from typing import Any

from logger.report import quoted
from utils.run_directory import RunPaths

from .spec import SweepSpec

TOP = 5  # trials listed in the summary


def trial_run(save_dir: Path, spec: SweepSpec, number: int) -> RunPaths:
    """Trial N's run directories, save_dir/models/<sweep>/trial_NNN and save_dir/log/<sweep>/trial_NNN: so
    `tensorboard --logdir save_dir/log/<sweep>` shows the sweep's trials together."""
    return RunPaths.under(save_dir, spec.name, f"trial_{number:03d}")


def write_ledger(study: Any, spec: SweepSpec, sweep_dir: Path, save_dir: Path) -> Path:
    """trials.csv: number, state, the objective's best value and epoch, epochs done, each parameter, the run
    directory."""
    from optuna.trial import TrialState

    metric = spec.objective[1]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", metric, "best_epoch", "epochs_done", *spec.space, "run_dir"])
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        attrs = trial.user_attrs
        value = trial.value if trial.state == TrialState.COMPLETE else attrs.get("best", "")
        run = trial_run(save_dir, spec, trial.number).checkpoints
        params = [trial.params.get(key, "") for key in spec.space]
        writer.writerow([trial.number, trial.state.name, value, attrs.get("best_epoch", ""),
                         attrs.get("epochs_done", ""), *params, run])  # fmt: skip
    path = sweep_dir / "trials.csv"
    temporary = path.with_name(f".trials.csv.{os.getpid()}")
    temporary.write_text(buffer.getvalue())
    os.replace(temporary, path)
    return path


def summary(study: Any, spec: SweepSpec, sweep_dir: Path, save_dir: Path) -> str:
    """The best trial with the commands to retrain and test it, the top trials, Optuna's parameter
    importances, and where the ledger is."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    counts.pop("waiting")
    lines = [f"Sweep {spec.name}: " + ", ".join(f"{n} {name}" for name, n in counts.items() if n)]
    if not done:
        return "\n".join(lines + [f"  no trial completed; trials.csv: {quoted(sweep_dir / 'trials.csv')}"])
    ranked = sorted(done, key=lambda trial: trial.value, reverse=spec.objective[0] == "max")
    best = ranked[0]
    run = trial_run(save_dir, spec, best.number).checkpoints
    lines += [
        f"  best      trial {best.number}: {' '.join(spec.objective)} {best.value:.6g} at epoch "
        f"{best.user_attrs.get('best_epoch')}",
        f"  params    {_shown(best.params)}",
        f"  retrain   python train.py -c {quoted(run / 'config.yaml')}",
        f"  test      python test.py --resume {quoted(run)}",
        f"  top {min(TOP, len(ranked))}",
    ]
    lines += [f"    trial {t.number:<4} {t.value:<10.6g} {_shown(t.params)}" for t in ranked[:TOP]]
    importances = _importances(study, len(done))
    if importances:
        lines.append("  importance " + ", ".join(f"{key} {value:.2f}" for key, value in importances.items()))
    lines.append(f"  ledger    {quoted(sweep_dir / 'trials.csv')}")
    lines.append(f"  compare   tensorboard --logdir {quoted(save_dir / 'log' / spec.name)}  (HParams tab)")
    return "\n".join(lines)


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in params.items())  # fmt: skip


def _importances(study: Any, completed: int) -> dict[str, float]:
    """Optuna's fANOVA importances; they need two completed trials over more than one value."""
    import optuna

    if completed < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # every completed trial had the same parameters: nothing to attribute
        return {}
