"""Runs side by side, from their files alone (config.yaml, metrics.csv, and run.json where present): the
config keys whose values differ, the monitored metric's best and last values, epochs, wall time and
steps/s; grouped over a key such as the seed as mean ± std."""

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.errors import ConfigError

from .report import flat_hparams

MEASURES = 5  # the table's last columns: best and last metric, epochs, wall seconds, steps/s


@dataclass
class RunFiles:
    """One run's records: its config as flat key paths and each epoch tag's values in step order."""

    label: str
    config: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]]
    steps: int
    seconds: float | None
    monitor: tuple[str, str] | None
    values: dict[str, Any] = field(default_factory=dict)  # the table's cells for this run


def run_paths(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, log dir) of a run given by either: save_dir/models/<name>/<id> or save_dir/log/..."""
    path = path.resolve()
    root, kind = path.parents[2] if len(path.parents) > 2 else path, path.parent.parent.name
    other = {"models": "log", "log": "models"}.get(kind)
    if other is None or not (path / ("config.yaml" if kind == "models" else "metrics.csv")).is_file():
        raise ConfigError(
            f"{path}: not a run directory (give saved/models/<name>/<run_id> or saved/log/<name>/<run_id>)"
        )
    mirror = root / other / path.parent.name / path.name
    return (path, mirror) if kind == "models" else (mirror, path)


def read_run(path: Path) -> RunFiles:
    """A run's files, read; ConfigError naming what is missing."""
    checkpoints, logs = run_paths(path)
    for needed in (checkpoints / "config.yaml", logs / "metrics.csv"):
        if not needed.is_file():
            raise ConfigError(f"{needed}: missing; compare.py reads each run's config.yaml and metrics.csv")
    config = yaml.safe_load((checkpoints / "config.yaml").read_text()) or {}
    config.pop("resolved", None)
    curves: dict[str, list[tuple[int, float]]] = {}
    steps = 0
    with (logs / "metrics.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            steps = max(steps, step)
            if row["tag"].startswith("epoch/"):
                curves.setdefault(row["tag"][len("epoch/") :], []).append((step, float(row["value"])))
    record = checkpoints / "run.json"
    seconds = json.loads(record.read_text()).get("seconds") if record.is_file() else None
    monitor = str((config.get("trainer") or {}).get("monitor", "off")).split()
    label = f"{config.get('name', checkpoints.parent.name)}/{checkpoints.name}"
    return RunFiles(
        label, flat_hparams(config), curves, steps, seconds, tuple(monitor) if len(monitor) == 2 else None
    )


def metric_of(runs: list[RunFiles], chosen: str | None) -> tuple[str, str]:
    """(mode, metric): the one asked for, else the first run's monitored metric, else val_loss or loss."""
    if chosen:
        mode = next((run.monitor[0] for run in runs if run.monitor and run.monitor[1] == chosen), None)
        return mode or ("max" if "acc" in chosen else "min"), chosen
    for run in runs:
        if run.monitor:
            return run.monitor
    return "min", "val_loss" if any("val_loss" in run.curves for run in runs) else "loss"


def table(runs: list[RunFiles], metric: tuple[str, str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: run, each differing config key, best and last metric, epochs, wall time, steps/s."""
    keys = sorted({key for run in runs for key in run.config})
    differing = [
        key for key in keys if len({json.dumps(run.config.get(key), default=str) for run in runs}) > 1
    ]
    differing = [key for key in differing if key != "name"]
    mode, name = metric
    header = ["run", *differing, f"best {name}", f"last {name}", "epochs", "wall s", "steps/s"]
    rows = []
    for run in runs:
        values = [value for _, value in run.curves.get(name, [])]
        best = (min if mode == "min" else max)(values) if values else None
        wall = run.seconds
        rate = run.steps / wall if wall else None
        epochs = len(next(iter(run.curves.values()), []))
        cells = [run.label, *(run.config.get(key) for key in differing)]
        run.values = dict(zip(header, [*cells, best, values[-1] if values else None, epochs, wall, rate]))
        rows.append([run.values[column] for column in header])
    return header, rows


def grouped(header: list[str], runs: list[RunFiles], over: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Runs equal in every differing key but `over` (e.g. seed) as one row: numbers as mean ± std, with n."""
    unknown = [key for key in over if key not in header]
    if unknown:
        raise ConfigError(
            f"--group-by {', '.join(unknown)}: not a key whose value differs between these runs "
            f"(those are: {', '.join(header[1:-MEASURES]) or 'none'})"
        )
    kept = [column for column in header[1:] if column not in over]  # the config keys, then MEASURES
    groups: dict[str, list[RunFiles]] = {}
    for run in runs:
        identity = json.dumps([run.values[column] for column in kept[:-MEASURES]], default=str)
        groups.setdefault(identity, []).append(run)
    rows = []
    for members in groups.values():
        cells = [f"{len(members)} runs" if len(members) > 1 else members[0].label]
        for column in kept:
            values = [run.values[column] for run in members]
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if column in kept[-MEASURES:] and len(numbers) == len(values) and len(values) > 1:
                cells.append(f"{statistics.mean(numbers):.4g} ± {statistics.stdev(numbers):.2g}")
            else:
                cells.append(values[0])
        rows.append(cells)
    return ["runs", *kept], rows


def render(header: list[str], rows: list[list[Any]], form: str) -> str:
    """text (aligned columns), csv or md."""
    cells = [[_cell(value) for value in row] for row in rows]
    if form == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *cells])
        return buffer.getvalue().rstrip("\n")
    if form == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(str(column)), *(len(row[i]) for row in cells)) for i, column in enumerate(header)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def plot(runs: list[RunFiles], metric: tuple[str, str], out: Path) -> None:
    """The metric's curve per run (by epoch) into `out`; matplotlib is the optional `[plot]` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ConfigError('--plot needs matplotlib: pip install -e ".[plot]"') from None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        values = [value for _, value in run.curves.get(metric[1], [])]
        axes.plot(range(1, len(values) + 1), values, marker=".", label=run.label)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric[1])
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
