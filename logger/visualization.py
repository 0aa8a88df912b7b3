"""TensorBoard event files through torch's SummaryWriter, behind explicit methods that do nothing when off."""
from pathlib import Path

import torch
from torch import nn


class TensorboardWriter:
    """`purge_step` makes TensorBoard drop events a killed run wrote past its last checkpoint, so resumed
    curves continue without overlap."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import, paid only when used

            self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self._writer:
            for name, value in values.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def add_image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self._writer:
            from torchvision.utils import make_grid

            self._writer.add_image(tag, make_grid(images.detach().cpu()[:64], nrow=8, normalize=True), step)

    def add_histograms(self, model: nn.Module, step: int) -> None:
        if self._writer:
            for name, parameter in model.named_parameters():
                self._writer.add_histogram(name, parameter.detach().cpu(), step, bins="auto")

    def close(self) -> None:
        if self._writer:
            self._writer.close()
