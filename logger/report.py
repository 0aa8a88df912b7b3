"""What a person reads: the header that introduces a run, one line per epoch, and the summary at its end."""

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from utils import distributed


def shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:  # another drive on Windows
        return str(path)


def describe_data(name: str, loader: DataLoader | None) -> str:
    if loader is None:
        return f"{name} none"
    samples = len(loader.sampler) if hasattr(loader.sampler, "__len__") else None
    try:
        batches = len(loader)
    except TypeError:  # an IterableDataset without a length
        batches = None
    shown = samples if samples is not None else "?"
    return f"{name} {shown} samples in {batches or '?'} batches of {loader.batch_size}"


def parameter_counts(models: dict[str, nn.Module]) -> str:
    """`MnistModel, 21,840 parameters (21,840 trainable)`; with several models each by name and class."""
    counts = {
        name: (type(model).__name__, sum(p.numel() for p in model.parameters()),
               sum(p.numel() for p in model.parameters() if p.requires_grad))
        for name, model in models.items()
    }  # fmt: skip
    if len(counts) == 1:
        kind, total, trainable = next(iter(counts.values()))
        return f"{kind}, {total:,} parameters ({trainable:,} trainable)"
    shown = ", ".join(f"{name} {kind} {total:,}" for name, (kind, total, _) in counts.items())
    frozen = sum(total - trainable for _, total, trainable in counts.values())
    return f"{shown} parameters ({f'{frozen:,} frozen' if frozen else 'all trainable'})"


def run_header(title: str, rows: dict[str, str]) -> str:
    width = max(map(len, rows))
    return "\n".join([title] + [f"  {key:<{width}}  {value}" for key, value in rows.items()])


def describe_run(trainer: Any, run: Any, title: str, source: str) -> str:
    """The lines that introduce a run: its data, length, device, model and where everything goes (`run`'s
    directories)."""
    options, step, loader, monitor = trainer.options, trainer.step, trainer.data_loader, trainer.monitor
    rows = {
        "config": source,
        "data": f"{describe_data('train', loader)}; {describe_data('valid', trainer.valid_data_loader)}",
        "length": f"{trainer.epochs} epochs x {step.steps_per_epoch()} steps = "
        f"{trainer.epochs * step.steps_per_epoch()} optimizer steps"
        + (f" of {step.accumulate} batches" if step.accumulate > 1 else ""),
        "device": f"{trainer.device}, precision {options['precision']}; workers {loader.num_workers}, "
        f"pin_memory {str(loader.pin_memory).lower()}",
        "speed": "; ".join(trainer.speed),
        "model": parameter_counts(trainer.unwrapped_models),
        "monitor": (
            f"{monitor.mode} {monitor.metric} (* marks a new best)"
            if monitor.metric
            else "off: model_best.pth is not written"
        ),
        "run dir": shown_path(run.checkpoints),
        "log dir": f"{shown_path(run.logs)} (info.log, metrics.csv"
        f"{', TensorBoard' if options['tensorboard'] else ''})",
    }
    if not trainer.speed:
        del rows["speed"]
    if distributed.is_distributed():
        rows["processes"] = (
            f"{distributed.world_size()} (DDP) x batch {loader.batch_size} = "
            f"global batch {distributed.world_size() * loader.batch_size}"
        )
    return run_header(title, rows)


def epoch_line(
    epoch: int, epochs: int, log: dict[str, float], seconds: float, improved: bool, pace: str = ""
) -> str:
    """`epoch 3/10  loss 0.2311  val_loss 0.1021  lr 0.001  2.3s  1,234/s data 5%  *`: 4 significant digits,
    the training pace (samples per second, share waiting for data), * = new best."""
    values = [f"{key} {value:.4g}" for key, value in log.items() if key != "epoch"]
    parts = [f"epoch {epoch}/{epochs}", *values, f"{seconds:.1f}s", pace, "*" if improved else ""]
    return "  ".join(part for part in parts if part)


@dataclass(frozen=True)
class Commands:
    """This run's scripts as a person pastes them: the launcher (python, or torchrun with its process count),
    the flags the checkpoint's config needs, paths shell-quoted. A schedule fixed to the run's length
    (`fixed`, e.g. OneCycleLR) cannot be resumed longer: training on is a new run from the weights
    (`init_from`, the evaluation model's key path)."""

    train: str = "python train.py"
    test: str = "python test.py"
    flags: str = ""
    fixed: str | None = None
    init_from: str = "arch"

    def resume(self, path: Path, *overrides: str) -> str:
        return " ".join([self.train, "--resume", quoted(path), *overrides]) + self.flags

    def evaluate(self, path: Path) -> str:
        return f"{self.test} --resume {quoted(path)}{self.flags}"

    def export(self, path: Path) -> str:
        """export.py, which runs as one process whatever the launcher of the run."""
        return f"python export.py --resume {quoted(path)}{self.flags}"

    def train_longer(self, run_dir: Path, weights: Path, epochs: int) -> str:
        if self.fixed is None:
            return self.resume(run_dir, f"trainer.epochs={epochs}")
        new_run = f"{self.train} -c {quoted(run_dir / 'config.yaml')}"
        start = f"{self.init_from}.init_from.path={quoted(weights)} {self.fixed}.args.total_steps=auto"
        return (
            f"{new_run} {start}  (a new run from these weights: {self.fixed} was fixed to this run's length)"
        )


def quoted(path: Path) -> str:
    """A path as typed in a shell: relative when below the working directory, quoted when it must be."""
    return shlex.quote(shown_path(path))


def run_summary(
    seconds: float,
    epochs_done: int,
    stopped_early: bool,
    monitor: Any,
    run_dir: Path,
    log_dir: Path,
    tensorboard: bool,
    commands: Commands,
    has_test_data: bool = True,
    resumed_at: tuple[int, int, int, int] | None = None,
) -> str:
    """Elapsed time, the best epoch and where things are, with the commands to run next. `resumed_at`: the
    (epoch, batch, step) this process began at and the run's step now, so that what this process trained,
    and in what time, is told apart from the whole run."""
    how = f"stopped early after {epochs_done} epochs" if stopped_early else f"finished {epochs_done} epochs"
    if resumed_at is not None:
        epoch, batch, began, steps = resumed_at
        where = f"epoch {epoch}{f', batch {batch}' if batch else ''}"
        how += f" ({steps} steps in all, {steps - began} in this process, which resumed at {where})"
    lines = [f"Done: {how} in {_duration(seconds)}."]
    best = run_dir / "model_best.pth"
    if monitor.metric and monitor.monitor_best_epoch is not None:
        lines.append(
            f"  best      {monitor.metric} {monitor.monitor_best:.4g} at epoch {monitor.monitor_best_epoch}: "
            f"{shown_path(best)}"
        )
    last = run_dir / "checkpoint-last.pth"
    lines.append(f"  last      {shown_path(last)}")
    evaluated = best if monitor.metric and best.exists() else last
    test = commands.evaluate(evaluated)
    if not has_test_data:
        test += " -c test.yaml  (this config has no test data: give test.yaml a test_data_loader section)"
    lines.append(f"  test      {test}")
    lines.append(f"  deploy    {commands.export(evaluated)}")
    curves = f"tensorboard --logdir {quoted(log_dir.parent)}" if tensorboard else "(TensorBoard is off)"
    lines.append(f"  curves    {curves}; every scalar is also in {shown_path(log_dir / 'metrics.csv')}")
    lines.append(f"  continue  {commands.train_longer(run_dir, evaluated, 2 * epochs_done)}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return (
        f"{hours}h {minutes:02d}m"
        if hours
        else f"{minutes}m {seconds:02.0f}s"
        if minutes
        else f"{seconds:.1f} s"
    )


def flat_hparams(config: dict, prefix: str = "") -> dict[str, Any]:
    """The config's leaves as `section.key` -> value, in the types TensorBoard's HParams tab takes."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{path}."))
        else:
            flat[path] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


# the keys that differ between runs in practice: what the optimizer, schedule, batch, length and model are
VARYING = re.compile(
    r"(optimizer|lr_scheduler|arch|(optimizers|lr_schedulers|models)\.[^.]+)\.(type|args\..+)"
    r"|data_loader\.args\.batch_size|trainer\.(epochs|accumulate_grad_batches|precision)|seed|loss(\..+)?"
)


def chosen_hparams(config: dict, overrides: list[str] | tuple = ()) -> dict[str, Any]:
    """The hyperparameters worth comparing runs by (HParams tab, MLflow params, W&B config): the VARYING keys
    and every key given on the command line, not all ~50 options."""
    given = {text.partition("=")[0] for text in overrides}
    return {
        key: value
        for key, value in flat_hparams(config).items()
        if VARYING.fullmatch(key) or key in given or any(key.startswith(f"{g}.") for g in given)
    }
