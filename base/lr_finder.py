"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks"; Lightning's
lr_find is the reference): train a copy of the model for a few steps while the learning rate grows
exponentially, record the smoothed loss, and suggest the rate where it falls fastest. It runs on copies of the
model and optimizer, with every global RNG put back, so the run that follows starts exactly as without it.
"""

import contextlib
import copy
import csv
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from utils.device import batch_to_device
from utils.seeding import rng_state, set_rng_state


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    loader: Iterable,
    device: torch.device,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    channels_last: bool = False,
) -> tuple[list[float], list[float]]:
    """(learning rates, smoothed losses) of `steps` training steps on copies of the model and optimizer, the
    rate multiplied by a constant factor each step; stops early once the loss diverges (4x its best)."""
    saved = rng_state()
    model, optimizer = copy.deepcopy((model, optimizer))  # one memo: the copied optimizer steps the copy
    model.train()
    factor = (max_lr / min_lr) ** (1 / max(steps - 1, 1))
    lrs, losses, smoothed, best = [], [], 0.0, math.inf
    try:
        batches = _cycled(loader)
        for step in range(steps):
            lr = min_lr * factor**step
            for group in optimizer.param_groups:
                group["lr"] = lr
            data, target = batch_to_device(*next(batches), device, channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = criterion(model(data), target)
            loss = loss["loss"] if isinstance(loss, dict) else loss
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            smoothed = 0.98 * smoothed + 0.02 * value  # fastai's and Lightning's exponential smoothing
            debiased = smoothed / (1 - 0.98 ** (step + 1))
            lrs.append(lr)
            losses.append(debiased)
            best = min(best, debiased)
            if not math.isfinite(debiased) or debiased > 4 * best:
                break
    finally:
        set_rng_state(saved)
    return lrs, losses


def _cycled(loader: Iterable) -> Any:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the training data yielded no batches")


def suggestion(lrs: list[float], losses: list[float]) -> float | None:
    """The rate at the steepest descent of the smoothed loss (in log-lr), skipping the noisy first ten steps
    and the divergent end, as Lightning suggests; None when the curve is too short to tell."""
    points = [(math.log10(lr), loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)][10:-1]
    if len(points) < 3:
        return None
    slopes = [(points[i + 1][1] - points[i - 1][1]) / (points[i + 1][0] - points[i - 1][0]) for i in
              range(1, len(points) - 1)]  # fmt: skip
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return 10 ** points[steepest + 1][0]


def write_curve(
    lrs: list[float], losses: list[float], suggested: float | None, directory: Path
) -> list[Path]:
    """lr_find.csv always; lr_find.png (loss against lr, log scale, the suggestion marked) with matplotlib."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "lr_find.csv"]
    with written[0].open("w", newline="") as file:
        rows = csv.writer(file)
        rows.writerow(["lr", "smoothed_loss"])
        rows.writerows(zip(lrs, losses))
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        from matplotlib import pyplot
    except ImportError:
        return written
    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot(lrs, losses)
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("smoothed training loss")
    if suggested is not None:
        axes.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2e}")
        axes.legend()
    figure.tight_layout()
    figure.savefig(directory / "lr_find.png", dpi=100)
    pyplot.close(figure)
    return [*written, directory / "lr_find.png"]
