"""Running means of losses and metrics, kept on the device so that training never waits on the host."""

import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .errors import TrainingError
from .user_code import defined_at

logger = logging.getLogger(__name__)


class MetricTracker:
    """Sample-weighted means. Tensor values are summed on the device and `result()` is the single host sync
    per read; Python numbers (pytorch-template's metrics return them) are summed on the host. Also keeps
    pytorch-template's interface: `MetricTracker(*keys, writer=None)`, `update`, `avg`, `result`."""

    def __init__(
        self, *keys: str, writer: Any = None, device: torch.device | None = None, synced: bool = True
    ):
        self.keys = list(keys)
        self.writer, self.device = writer, device
        self.synced = synced  # summed over DDP ranks on reading; False for one rank's own batches
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor | float | None] = dict.fromkeys(self.keys)
        self._counts = dict.fromkeys(self.keys, 0)

    def add_key(self, key: str) -> None:
        """Track one more key (a loss term seen for the first time); every DDP rank adds it at one batch."""
        if key not in self._counts:
            self.keys.append(key)
            self._sums[key], self._counts[key] = None, 0

    def update(self, key: str, value: torch.Tensor | float, n: int = 1) -> None:
        if self.writer is not None:
            self.writer.add_scalar(key, value)
        total = self._sums[key]
        if not isinstance(value, torch.Tensor):
            self._sums[key] = float(value) * n + (total or 0.0)
        elif isinstance(total, torch.Tensor):
            total.add_(value.detach(), alpha=n)  # one kernel, no new tensor
        else:
            self._sums[key] = value.detach().float() * n + (total or 0.0)
        self._counts[key] += n

    def totals(self) -> torch.Tensor:
        """Sums then counts of every key, summed over DDP ranks: the one tensor an epoch reads back."""
        device = next((s.device for s in self._sums.values() if isinstance(s, torch.Tensor)), self.device)
        sums = [
            torch.as_tensor(0.0 if total is None else total, dtype=torch.float32, device=device)
            for total in self._sums.values()
        ]
        counts = torch.tensor([float(self._counts[key]) for key in self.keys], device=device)
        totals = torch.cat([torch.stack(sums), counts]) if sums else counts
        return distributed.all_reduce_sum(totals) if self.synced else totals

    def all_finite(self, keys: list[str]) -> bool:
        """Whether the sums of `keys` are finite; under DDP on every rank (one all-reduce of one number)."""
        sums = [total for total in (self._sums.get(key) for key in keys) if total is not None]
        if not (self.synced and distributed.is_distributed()):
            return all(math.isfinite(float(total)) for total in sums)  # a host read per loss term
        tensors = [total.reshape(()).float() for total in sums if isinstance(total, torch.Tensor)]
        numbers = sum(not math.isfinite(total) for total in sums if isinstance(total, float))
        bad = torch.tensor(float(numbers), device=tensors[0].device if tensors else self.device)
        bad += sum((~torch.isfinite(total)).float() for total in tensors)
        return not bool(distributed.all_reduce_sum(bad))

    def result(self) -> dict[str, float]:
        values = self.totals().tolist() if self.keys else []
        sums, counts = values[: len(self.keys)], values[len(self.keys) :]
        return {key: total / count for key, total, count in zip(self.keys, sums, counts) if count}

    def local_mean(self, key: str) -> float | None:
        """This rank's running mean of `key`, no collective: one host read, for a progress line."""
        total, count = self._sums.get(key), self._counts.get(key, 0)
        return float(total) / count if count and total is not None else None

    def avg(self, key: str) -> float:
        return self.result()[key]

    def state_dict(self) -> dict:
        sums = {
            key: total.cpu() if isinstance(total, torch.Tensor) else total
            for key, total in self._sums.items()
            if total is not None
        }
        return {"sums": sums, "counts": dict(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        for key in [*state["sums"], *state["counts"]]:
            self.add_key(key)
        for key, total in state["sums"].items():
            self._sums[key] = (
                total.to(self.device or total.device) if isinstance(total, torch.Tensor) else total
            )
        self._counts.update(state["counts"])


def is_stateful(metric: Any) -> bool:
    """A metric object with the torchmetrics protocol: update(output, target), compute(), reset()."""
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


class EpochMetrics:
    """One epoch's losses and metrics. The loss is one tensor, or a dict of named terms (a multi-term loss's
    total under "loss", or a GAN's `loss_d` and `loss_g`), each averaged like a metric; `loss_names` are the
    ones known up front (others are added when first seen). A metric function is called per batch and
    averaged over samples; a stateful metric (update/compute/reset, e.g. torchmetrics' F1Score) sees every
    batch and computes once, so F1, AUROC or a confusion matrix are exact over the whole epoch. All survive a
    mid-epoch resume."""

    def __init__(
        self,
        metrics: dict[str, Callable],
        device: torch.device,
        loss_names: tuple[str, ...] = ("loss",),
        synced: bool = True,
    ):
        self.loss_names = list(loss_names)
        self.stateful = {name: metric for name, metric in metrics.items() if is_stateful(metric)}
        self.per_batch = {name: metric for name, metric in metrics.items() if name not in self.stateful}
        self.tracker = MetricTracker(*self.loss_names, *self.per_batch, device=device, synced=synced)
        self.metric_names = list(metrics)
        for metric in self.stateful.values():
            # torchmetrics keeps its state out of state_dict() unless told otherwise
            if callable(getattr(metric, "persistent", None)):
                metric.persistent(True)
            if isinstance(metric, nn.Module):
                metric.to(device)

    def reset(self) -> None:
        self.tracker.reset()
        for metric in self.stateful.values():
            metric.reset()

    @property
    def names(self) -> list[str]:
        return [*self.loss_names, *self.metric_names]

    def update(self, loss: torch.Tensor | dict[str, torch.Tensor], output: Any, target: Any) -> None:
        """Add one batch, weighted by its size, without reading anything back."""
        n = len(target)
        for name, value in (loss if isinstance(loss, dict) else {"loss": loss}).items():
            if name not in self.loss_names:
                self.loss_names.append(name)
                self.tracker.add_key(name)
            self.tracker.update(name, value, n)
        for name, metric in self.per_batch.items():
            self.tracker.update(name, _checked(metric, metric(output, target)), n)
        for metric in self.stateful.values():
            metric.update(output, target)

    def loss_is_finite(self) -> bool:
        """One host sync (an all-reduce under DDP, so that every rank decides alike): a loss's sum turns nan
        or inf with any non-finite batch loss."""
        return self.tracker.all_finite(self.loss_names)

    def result(self) -> dict[str, float]:
        values = self.tracker.result()
        if values:
            values.update({name: _as_float(metric.compute()) for name, metric in self.stateful.items()})
        return {name: values[name] for name in self.names if name in values}

    def state_dict(self) -> dict:
        stateful = {
            name: metric.state_dict()
            for name, metric in self.stateful.items()
            if callable(getattr(metric, "state_dict", None))
        }
        return {**self.tracker.state_dict(), "stateful": stateful}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.tracker.load_state_dict(state)
        self.loss_names += [key for key in state["counts"] if key not in self.names]
        for name, metric in self.stateful.items():
            if name in state.get("stateful", {}) and callable(getattr(metric, "load_state_dict", None)):
                metric.load_state_dict(state["stateful"][name])
            else:
                logger.warning(
                    "metric %s has no state_dict(): it restarts its count at the resumed batch", name
                )


def _checked(metric: Callable, value: Any) -> Any:
    """A metric's value, which must be a number or a one-element tensor; else the error names the metric."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number and not (isinstance(value, torch.Tensor) and value.numel() == 1):
        shown = (
            f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:60]
        )
        problem = f"the metric {defined_at(metric)} returned {shown}"
        raise TrainingError(f"{problem}: a metric returns a number or a one-element tensor")
    return value


def _as_float(value: Any) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)
