"""The run's records: TensorBoard event files (through torch's SummaryWriter), metrics.csv and the chosen
trackers (MLflow, W&B: logger/trackers.py), behind one small interface; each writes only when it is on."""

import csv
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from utils import distributed

from .run_record import finish_record
from .trackers import TrackerRuns, logger_specs, open_trackers

CSV_NAME = "metrics.csv"
CSV_COLUMNS = ["step", "tag", "value"]
HAND_OVER_S = 30.0  # the longest scalars are held from TensorBoard's writer thread


def open_writer(
    run: Any,
    options: dict,
    config: dict,
    hparams: dict,
    runs: TrackerRuns,
    purge_step: int | None,
    metric_names: list[str],
) -> "RunWriter":
    """The run's writer with the loggers `trainer.loggers` chose, on rank 0 (the other ranks compute only),
    with the config and the train/validation chart layout written."""
    main = distributed.is_main()
    names = [name for name, _ in logger_specs(options["loggers"])]
    title = f"{config.get('name')}/{run.run_id}"
    loggers = options["loggers"] if main else []
    trackers = open_trackers(loggers, runs, title, options["save_dir"], run, hparams)
    tensorboard = options["tensorboard"] and "tensorboard" in names and main
    writer = RunWriter(run.logs, tensorboard, "csv" in names and main, purge_step, trackers)
    writer.add_run_description(yaml.safe_dump(config, sort_keys=False), metric_names)
    return writer


def close_writer(writer: "RunWriter", run: Any, status: str, seconds: float, steps: int) -> None:
    """Complete run.json, give the trackers the run's files (config.yaml, run.json, info.log), and close."""
    if distributed.is_main():
        finish_record(run.checkpoints, status, seconds, steps)
        files = [run.checkpoints / name for name in ("config.yaml", "run.json")]
        writer.add_artifacts([*files, run.logs / "info.log"])
    writer.close(status)


class RunWriter:
    """Scalars to TensorBoard and metrics.csv, images, histograms, hparams and the config to TensorBoard.
    `purge_step` drops what a killed run logged past its last checkpoint, in both alike, so that resumed
    curves continue without gaps or duplicate rows."""

    def __init__(
        self,
        log_dir: Path,
        tensorboard: bool,
        csv: bool,
        purge_step: int | None = None,
        trackers: list[Any] | None = None,
    ):
        self._writer = None
        self._csv = None
        self._held: list[tuple[str, dict, int, float]] = []  # (prefix, values, step, wall time) not yet given
        self._handed_at = time.monotonic()
        self.trackers = trackers or []  # MLflow, W&B (logger/trackers.py)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, paid only when used

            self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        if csv:
            self._csv = _open_csv(Path(log_dir) / CSV_NAME, purge_step)

    def add_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Every value as a scalar `prefix/name` at `step`. TensorBoard gets them as one event, a summary with
        a value per tag, held until the epoch ends (hand_over) or HAND_OVER_S have passed: each event wakes
        TensorBoard's writer thread, which then takes the GIL and a core from the training loop. TensorBoard
        itself writes its events to disk only every 120 s, so holding them delays nothing it shows by much.
        metrics.csv and the trackers get each value at once."""
        if self._writer and values:
            self._held.append((prefix, dict(values), step, time.time()))  # the wall time it was logged at
            if time.monotonic() - self._handed_at >= HAND_OVER_S:
                self.hand_over()
        if self._csv:
            self._csv.writerows([[step, f"{prefix}/{name}", value] for name, value in values.items()])
        for tracker in self.trackers:
            tracker.scalars({f"{prefix}/{name}": value for name, value in values.items()}, step)

    def hand_over(self) -> None:
        """Give TensorBoard's writer the scalars held so far (at each epoch's end, and before anything else is
        written to it, so that its events stay in order). Their summaries are built here too, off the
        training loop."""
        if self._held:
            from torch.utils.tensorboard.summary import Summary, scalar

            for prefix, values, step, wall_time in self._held:
                tagged = [scalar(f"{prefix}/{name}", value).value[0] for name, value in values.items()]
                self._writer.file_writer.add_summary(Summary(value=tagged), step, wall_time)
            self._held.clear()
        self._handed_at = time.monotonic()

    def add_image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self._writer:
            self.hand_over()
            from torchvision.utils import make_grid

            self._writer.add_image(tag, make_grid(images.detach().cpu()[:64], nrow=8, normalize=True), step)

    def add_histograms(self, model: nn.Module, step: int) -> None:
        if self._writer:
            self.hand_over()
            for name, parameter in model.named_parameters():
                self._writer.add_histogram(name, parameter.detach().cpu(), step, bins="auto")

    def add_run_description(self, config_yaml: str, metric_names: list[str]) -> None:
        """The resolved config as text, and a custom-scalars layout with train and validation of each
        metric on one chart."""
        if not self._writer:
            return
        self._writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)
        charts = {name: ["Multiline", [f"epoch/{name}", f"epoch/val_{name}"]] for name in metric_names}
        self._writer.add_custom_scalars({"train and validation": charts})

    def add_hparams(
        self, hparams: dict[str, Any], last: dict[str, float], best: dict[str, float], step: int
    ) -> None:
        """The HParams tab (and each tracker's summary): this run's hyperparameters with its metrics at the
        last epoch and at the best one."""
        metrics = {f"last/{name}": value for name, value in last.items()}
        metrics.update({f"best/{name}": value for name, value in best.items()})
        for tracker in self.trackers:
            tracker.hparams(hparams, metrics, step)
        if not self._writer:
            return
        self.hand_over()
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        tagged = {f"hparams/{name}": value for name, value in metrics.items()}
        for summary in hparams_summary(hparams, tagged):
            self._writer.file_writer.add_summary(summary, step)
        for tag, value in tagged.items():
            self._writer.add_scalar(tag, value, step)

    def add_artifacts(self, paths: list[Path]) -> None:
        """Files the trackers keep with the run (config.yaml, info.log, run.json)."""
        for tracker in self.trackers:
            for path in paths:
                tracker.artifact(Path(path))

    def close(self, status: str = "finished") -> None:
        """`status`: finished, killed (stopped by a signal, to be resumed) or failed."""
        if self._writer:
            self.hand_over()
            self._writer.close()
        if self._csv:
            self._csv.close()
        for tracker in self.trackers:
            tracker.close(status)


class _CsvRows:
    def __init__(self, file: Any):
        self._file, self._rows = file, csv.writer(file)

    def writerows(self, rows: list[list]) -> None:
        """Written through at once (one flush per call): a killed run keeps every row it logged."""
        self._rows.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _open_csv(path: Path, purge_step: int | None) -> _CsvRows:
    """Append to metrics.csv; on resume, first drop the rows a killed run wrote at or after `purge_step`."""
    if purge_step is not None and path.is_file():
        with path.open(newline="") as file:
            kept = [row for row in csv.reader(file) if row and (row[0] == "step" or int(row[0]) < purge_step)]
        with path.open("w", newline="") as file:
            csv.writer(file).writerows(kept)
    is_new = not path.is_file() or path.stat().st_size == 0
    rows = _CsvRows(path.open("a", newline=""))
    if is_new:
        rows.writerows([CSV_COLUMNS])
    return rows
