"""The run's records: TensorBoard event files (through torch's SummaryWriter) and metrics.csv, behind one
small interface; each writes only when it is on."""

import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn

CSV_NAME = "metrics.csv"
CSV_COLUMNS = ["step", "tag", "value"]


class RunWriter:
    """Scalars to TensorBoard and metrics.csv, images, histograms, hparams and the config to TensorBoard.
    `purge_step` drops what a killed run logged past its last checkpoint, in both alike, so that resumed
    curves continue without gaps or duplicate rows."""

    def __init__(self, log_dir: Path, tensorboard: bool, csv: bool, purge_step: int | None = None):
        self._writer = None
        self._csv = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, paid only when used

            self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        if csv:
            self._csv = _open_csv(Path(log_dir) / CSV_NAME, purge_step)

    def add_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            if self._writer:
                self._writer.add_scalar(f"{prefix}/{name}", value, step)
            if self._csv:
                self._csv.writerow([step, f"{prefix}/{name}", value])

    def add_image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self._writer:
            from torchvision.utils import make_grid

            self._writer.add_image(tag, make_grid(images.detach().cpu()[:64], nrow=8, normalize=True), step)

    def add_histograms(self, model: nn.Module, step: int) -> None:
        if self._writer:
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

    def add_hparams(self, hparams: dict[str, Any], final_metrics: dict[str, float], step: int) -> None:
        """The HParams tab: this run's hyperparameters with its final metrics, in the run's own event file."""
        if not self._writer:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = {f"hparams/{name}": value for name, value in final_metrics.items()}
        for summary in hparams_summary(hparams, metrics):
            self._writer.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        if self._csv:
            self._csv.close()


class _CsvRows:
    def __init__(self, file: Any):
        self._file, self._rows = file, csv.writer(file)

    def writerow(self, row: list) -> None:
        self._rows.writerow(row)
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
        rows.writerow(CSV_COLUMNS)
    return rows
