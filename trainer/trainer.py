"""The per-batch training loop: the file users are expected to edit."""
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from base import BaseTrainer
from utils.device import to_device
from utils.metrics import EpochMetrics


class Trainer(BaseTrainer):
    """One epoch of training and one of validation; everything else lives in BaseTrainer."""

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        for batch_idx, (data, target) in self._train_batches(epoch):
            data, target = to_device(data, self.device), to_device(target, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            output = self.model(data)
            loss = self.criterion(output, target)  # a second loss term goes here: loss = loss + w * other
            loss.backward()
            if self._loss_is_usable(loss, epoch, batch_idx):
                self.optimizer.step()
                self.train_metrics.update(loss, output, target)
            self._after_step(epoch, batch_idx, data, loss)
        return self.train_metrics.result()

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        progress = tqdm(self.valid_data_loader, desc=f"valid {epoch}/{self.epochs}", leave=False,
                        disable=not self._show_progress)
        return evaluate(self.model, progress, self.criterion, self.valid_metrics, self.device)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, criterion: Callable[[Any, Any], torch.Tensor],
             metrics: EpochMetrics, device: torch.device) -> dict[str, float]:
    """Mean loss and metrics over `batches` in eval mode; shared by validation and test.py."""
    model.eval()
    metrics.reset()
    for data, target in batches:
        data, target = to_device(data, device), to_device(target, device)
        output = model(data)
        metrics.update(criterion(output, target), output, target)
    return metrics.result()
