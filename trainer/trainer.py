"""The per-batch training loop: the file users are expected to edit."""
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from base import BaseTrainer
from utils.metrics import MetricTracker


class Trainer(BaseTrainer):
    """One epoch of training and one of validation; everything else lives in BaseTrainer."""

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        for batch_idx, (data, target) in self._train_batches(epoch):
            data, target = data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            output = self.model(data)
            loss = self.criterion(output, target)
            loss.backward()
            if self._loss_is_usable(loss, epoch, batch_idx):
                self.optimizer.step()
                record_batch(self.train_metrics, loss, output, target, self.metric_ftns)
            self._after_step(epoch, batch_idx, data, loss)
        return self.train_metrics.result()

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        progress = tqdm(self.valid_data_loader, desc=f"valid {epoch}", leave=False, disable=not self._show_progress)
        return evaluate(self.model, progress, self.criterion, self.metric_ftns, self.device, self.valid_metrics)


def record_batch(tracker: MetricTracker, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor,
                 metric_ftns: dict[str, Callable]) -> None:
    """Add one batch's loss and metrics, weighted by its size, without reading them back."""
    tracker.update("loss", loss, n=len(target))
    for name, metric in metric_ftns.items():
        tracker.update(name, metric(output, target), n=len(target))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, criterion: Callable, metric_ftns: dict[str, Callable],
             device: torch.device, tracker: MetricTracker) -> dict[str, float]:
    """Mean loss and metrics over `batches` in eval mode; shared by validation and test.py."""
    model.eval()
    tracker.reset()
    for data, target in batches:
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(data)
        record_batch(tracker, criterion(output, target), output, target, metric_ftns)
    return tracker.result()
