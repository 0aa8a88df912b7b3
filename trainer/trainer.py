"""The per-batch training loop: the file users are expected to edit."""

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterable

import torch
from torch import nn

from base import BaseTrainer
from utils.device import batch_to_device
from utils.metrics import EpochMetrics


class Trainer(BaseTrainer):
    """One epoch of training and one of validation; everything else lives in BaseTrainer, whose docstring
    states what the loop must call. `self.step` holds the mechanics of precision, accumulation, clipping,
    EMA and the non-finite policy (base/train_step.py)."""

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        for batch_idx, (data, target) in self.train_batches(epoch):
            data, target = self.to_device(data, target)
            with self.step.accumulating(batch_idx):  # DDP all-reduces gradients only at the end of a window
                with self.step.autocast():
                    output = self.model(data)
                    loss = self.criterion(output, target)  # a second term goes here: loss = loss + w * aux
                self.step.backward(loss, batch_idx, self.batch_share)  # / window; GradScaler under 16-mixed
            self.record_batch(loss, output, target)
            if self.step.window_done(batch_idx):
                self.step.clip(self.optimizer)  # unscales first under 16-mixed; off unless configured
                self.step.optimizer_step(self.optimizer)  # + the EMA; no step after a nan under `skip`
                self.optimizer.zero_grad(set_to_none=True)
                self.after_optimizer_step(epoch, batch_idx, data, loss)
        return self.train_metrics.result()

    @staticmethod
    def evaluate_models(
        models: dict[str, nn.Module],
        eval_name: str,
        criteria: dict[str, Callable],
        batches: Iterable,
        metrics: EpochMetrics,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        channels_last: bool = False,
    ) -> dict[str, float]:
        """test.py's evaluation: the loss and metrics of the evaluation model, as in validation."""
        criterion = next(iter(criteria.values()))
        return evaluate(models[eval_name], batches, criterion, metrics, device, autocast, channels_last)

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        return evaluate(
            self.step.eval_model,
            self.valid_batches(epoch),
            self.criterion,
            self.valid_metrics,
            self.device,
            self.step.autocast,
            self.options["channels_last"],
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    criterion: Callable[[Any, Any], torch.Tensor],
    metrics: EpochMetrics,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean loss and metrics over `batches` in eval mode, in the training precision; shared by validation
    and test.py."""
    model.eval()
    metrics.reset()
    for data, target in batches:
        data, target = batch_to_device(data, target, device, channels_last)
        with autocast():
            output = model(data)
            loss = criterion(output, target)
        metrics.update(loss, output, target)
    return metrics.result()
