"""BaseTrainer: the mechanics around the per-batch loop that users don't need to edit."""

import contextlib
import copy
import logging
import signal
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from logger import FILE_ONLY, FITTED
from logger.report import Commands, chosen_hparams, epoch_line
from logger.trackers import TrackerRuns
from logger.writer import RunWriter, close_writer, open_writer
from utils import distributed
from utils.device import batch_to_device
from utils.errors import TrainingError, TrainingInterrupted
from utils.metrics import EpochMetrics, is_stateful
from utils.run_directory import RunPaths
from utils.signals import StopRequest
from utils.workers import Shielded, shield_workers

from .base_data_loader import BatchStream
from .checkpointer import Checkpointer, run_parts
from .monitor import Monitor
from .pace import Pace
from .progress import Progress, RngStreams
from .schedule import Schedule, learning_rates
from .train_step import CheckedLoss, TrainStep, unwrap

logger = logging.getLogger(__name__)


class BaseTrainer:
    """Epochs, validation, LR scheduling, monitoring, early stop, checkpoints and exact resume.

    A subclass implements `_train_epoch(epoch)` and `_valid_epoch(epoch)` (trainer/trainer.py; a GAN in
    trainer/gan_trainer.py). The contract of `_train_epoch`, which is all the mechanics rely on:
    - iterate `self.train_batches(epoch)` for (batch index, batch): it continues a resumed epoch at its next
      batch, resets the epoch's metrics at its start and shows progress;
    - pass `self.batch_share` to `self.step.backward` (this rank's share of the global batch under DDP,
      else 1);
    - call `self.record_batch(loss, output, target)` after backward, for every batch (`loss` may be a dict of
      named terms: each is logged like a metric);
    - at the end of a window, for each optimizer: `self.step.clip`, `self.step.optimizer_step`, `zero_grad`;
      then once `self.after_optimizer_step(epoch, batch_idx, data, loss)`;
    - return `self.train_metrics.result()`.
    Models, optimizers, losses and schedules are dicts by name (`self.models["generator"]`); with one of each,
    `self.model`, `self.optimizer`, `self.criterion`. A subclass logging other names than `loss` declares them
    in `logged`. `options` are the trainer section's values; `config` is only the record written into
    checkpoints and TensorBoard. Nothing is written before `fit(run)` gives the run's directories.
    """

    logged: tuple[str, ...] | None = None

    def __init__(
        self,
        models: dict[str, nn.Module],
        criteria: dict[str, Callable],
        metric_ftns: dict[str, Callable],
        optimizers: dict[str, torch.optim.Optimizer],
        data_loader: DataLoader,
        *,
        device: torch.device,
        options: dict[str, Any],
        monitor: tuple[str, str] | None = None,
        valid_data_loader: Any = None,
        schedules: dict[str, Schedule] | None = None,
        seed: int = 0,
        config: dict | None = None,
        eval_model: str | None = None,
    ):
        self.models, self.metric_ftns = models, metric_ftns
        self.criteria = {name: CheckedLoss(criterion) for name, criterion in criteria.items()}
        self.optimizers, self.schedules, self.device = optimizers, schedules or {}, device
        self.eval_name = eval_model or next(iter(models))
        self.model = models[self.eval_name]
        self.optimizer = next(iter(optimizers.values())) if len(optimizers) == 1 else None
        self.criterion = next(iter(self.criteria.values())) if len(criteria) == 1 else None
        self.data_loader, self.valid_data_loader = data_loader, valid_data_loader
        self.options, self.config, self.seed = options, config or {}, seed
        self.epochs, self.log_step = options["epochs"], options["log_step"]
        self.len_epoch = options["len_epoch"] or len(data_loader)
        self.step = TrainStep.from_options(models, device, options, self.len_epoch, self.eval_name)
        self.batches = BatchStream(data_loader)
        self.pace = Pace(options["profile"], options["progress_interval"])
        self.speed: list[str] = []  # what `auto` chose for speed, and why: the header's `speed` row
        self.monitor = Monitor(monitor, options["early_stop"])
        loss_names = self.logged or ("loss", *getattr(self.criterion, "terms", ()))
        self.train_metrics = EpochMetrics(metric_ftns, device, loss_names)
        separate = {name: copy.deepcopy(m) if is_stateful(m) else m for name, m in metric_ftns.items()}
        self.valid_metrics = EpochMetrics(separate, device, loss_names)
        self.progress = Progress()
        self.tracker_runs = TrackerRuns()  # MLflow and W&B run ids: --resume continues the same runs
        self.hparams = chosen_hparams(self.config)  # train.py adds the keys given on its command line
        parts = run_parts(
            self.unwrapped_models,
            self.eval_name,
            self.step.ema.module if self.step.ema else None,
            self.step,
            optimizers,
            self.schedules,
            self.train_metrics,
            self.batches,
        )
        flat = [self.progress, self.monitor, RngStreams(seed), self.tracker_runs]
        saving = {name: options[name] for name in Checkpointer.OPTIONS}
        self.checkpointer = Checkpointer(parts, flat, self.config, **saving)
        self.stop_request = StopRequest()
        for loader in (data_loader, valid_data_loader):
            shield_workers(loader)
        self.run: RunPaths | None = None  # the run's directories and writer arrive with fit()
        self.writer: RunWriter | None = None
        self.resumed, self.elapsed, self.commands = False, 0.0, Commands()
        self._finite_through, self._batch_idx = 0, 0
        self._show_progress = options["progress_bar"] and sys.stderr.isatty() and distributed.is_main()
        self._bar: tqdm | None = None

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    @property
    def unwrapped_model(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def unwrapped_models(self) -> dict[str, nn.Module]:
        return {name: unwrap(model) for name, model in self.models.items()}

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    def learning_rates(self) -> dict[str, float]:
        return learning_rates(self.optimizers)

    # ---- the epoch loop ----
    def fit(self, run: RunPaths, commands: Commands | None = None) -> None:
        """Train to `epochs`, writing into `run`; a signal stops after the current step with
        checkpoint-last.pth written."""
        self._open_run(run)
        self.commands = commands or Commands()  # what the stop message tells to run next
        started, status = time.monotonic(), "failed"
        try:
            with self.stop_request, logging_redirect_tqdm():
                for epoch in range(self.progress.epoch + 1, self.epochs + 1):
                    self._epoch(epoch)
                    if self.monitor.should_stop:
                        logger.info("%s", self.monitor.stop_reason)
                        break
            self.checkpointer.save_last(self.verified_state(), wait=True)  # the final state, any save_period
            self._finish(time.monotonic() - started)
            status = "finished"
        except TrainingInterrupted:
            status = "killed"  # to be resumed: the trackers mark the run so until it is
            raise
        finally:
            self.checkpointer.settle()
            close_writer(self.writer, self.run, status, time.monotonic() - started, self.global_step)

    def _open_run(self, run: RunPaths) -> None:
        """Where checkpoints and records go from now on; the writer opens here."""
        self.checkpointer.run_dir, self.run = run.checkpoints, run
        purge_step = self.global_step + 1 if self.resumed else None  # drop what a killed run logged later
        records = (self.config, self.hparams, self.tracker_runs)
        self.writer = open_writer(run, self.options, *records, purge_step, self.train_metrics.names)

    def _epoch(self, epoch: int) -> dict[str, float]:
        """Train and validate one epoch, then log it, step the scheduler and save what is due."""
        started = time.monotonic()
        if self.progress.batches_in_epoch == 0 or not self.progress.epoch_lrs:  # else resumed inside it
            self.progress.epoch_lrs = self.learning_rates()
        log = {"epoch": epoch, **self.progress.epoch_lrs, **self._train_epoch(epoch)}
        if self.valid_data_loader is not None:
            log.update({f"val_{k}": v for k, v in self._valid_epoch(epoch).items()})
        self._raise_if_nonfinite(epoch)
        for schedule in self.schedules.values():
            schedule.after_epoch(log)
        improved = self.monitor.update(log)
        self.progress.note_epoch(log, improved and self.monitor.mode != "off")
        self._log_epoch(log, time.monotonic() - started, improved)
        self.progress.epoch, self.progress.batches_in_epoch = epoch, 0
        self.checkpointer.save_epoch(self.checkpointer.state_dict, epoch, improved)  # no step since the check
        self._stop_if_requested()
        return log

    def _finish(self, seconds: float) -> None:
        self.elapsed = seconds
        last, best = self.progress.last_log, self.progress.best_log
        self.writer.add_hparams(self.hparams, last, best, self.global_step)

    def _log_epoch(self, log: dict[str, float], seconds: float, improved: bool) -> None:
        line = epoch_line(log["epoch"], self.epochs, log, seconds, improved, self.pace.summary())
        logger.info("%s", line, extra=FITTED)  # wrapped between fields to the terminal's width
        self.writer.add_scalars("epoch", {k: v for k, v in log.items() if k != "epoch"}, self.global_step)
        self.writer.hand_over()  # the epoch's scalars to TensorBoard's writer thread, now that it can run
        if self.options["tensorboard_histograms"]:
            self.writer.add_histograms(self.unwrapped_model, self.global_step)

    # ---- the helpers the per-batch loop calls (see the class docstring) ----
    def train_batches(self, epoch: int) -> Iterator[tuple[int, Any]]:
        """(batch index, batch) for this epoch; a resumed epoch continues at its next batch."""
        start = self._finite_through = self.progress.batches_in_epoch
        if start == 0:
            self.train_metrics.reset()
        label = f"epoch {epoch}/{self.epochs}"
        self.pace.start(self.run, label, self.len_epoch - start, self.train_metrics)
        with self._progress_bar(label, total=self.len_epoch, initial=start) as self._bar:
            try:
                for batch_idx in range(start, self.len_epoch):
                    self._batch_idx = batch_idx  # for record_batch's warning
                    yield batch_idx, self.pace.next_batch(self.batches)  # timed: samples/s, data wait
                    if self._bar is not None:
                        self._bar.update()
            finally:
                self.pace.finish()

    def _progress_bar(self, desc: str, iterable: Any = None, **counts: int) -> Any:
        """The terminal's bar, or where none is shown `iterable` itself (or nothing, for a bar updated by
        hand): a disabled tqdm still costs 0.1 ms to make."""
        if not self._show_progress:
            return contextlib.nullcontext() if iterable is None else iterable
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **counts)

    def valid_batches(self, epoch: int | None = None) -> Iterable:
        """The validation data, its workers started shielded from stop signals like the training data's; with
        `epoch`, under a progress bar when the terminal shows one."""
        batches = Shielded(self.valid_data_loader)
        return batches if epoch is None else self._progress_bar(f"valid {epoch}/{self.epochs}", batches)

    @property
    def batch_share(self) -> float:
        """This rank's share of the current global batch times the world size (1 without DDP): the loss weight
        under which DDP's gradient average is the mean over the global batch, an uneven last one included."""
        return self.batches.share

    def to_device(self, data: Any, target: Any) -> tuple[Any, Any]:
        """A batch on the training device; image batches in channels_last when the model is."""
        return batch_to_device(data, target, self.device, self.options["channels_last"])

    def record_batch(self, loss: torch.Tensor, output: Any, target: Any) -> None:
        """Add the batch to the epoch's metrics, without reading anything back. A loss the step found
        non-finite under `on_nonfinite: skip` is left out, with a warning; under `stop` the loss sum the
        metrics keep turns non-finite and is checked at the next read-back, before any save."""
        if self.step.loss_was_nonfinite:
            logger.warning(
                "Non-finite loss at epoch %d batch %d: step skipped (%d so far)",
                self.progress.epoch + 1,
                self._batch_idx,
                self.progress.skipped_steps + 1,
            )
            return
        self.train_metrics.update(loss, output, target)

    def after_optimizer_step(self, epoch: int, batch_idx: int, data: Any, loss: torch.Tensor) -> None:
        """Side concerns of one optimizer step: scheduler, logging, step checkpoints, signals."""
        self.step.end_iteration()
        self.progress.global_step += 1
        self.progress.skipped_steps += not self.step.stepped
        self.progress.batches_in_epoch = batch_idx + 1
        for schedule in self.schedules.values():
            schedule.after_optimizer_step()
        if self.global_step % self.log_step == 0:
            self._log_step(epoch, batch_idx, loss)
        if batch_idx == 0 and self.options["tensorboard_images"]:
            self.writer.add_image_grid("input", data, self.global_step)
        self.checkpointer.maybe_save_step(self.verified_state, self.global_step)
        self._stop_if_requested(agree=self.global_step % self.log_step == 0)

    def _log_step(self, epoch: int, batch_idx: int, loss: torch.Tensor | dict[str, torch.Tensor]) -> None:
        self._raise_if_nonfinite(epoch)
        losses = loss if isinstance(loss, dict) else {"loss": loss}
        norm = self.step.grad_norm
        read = [value.detach().float() for value in losses.values()] + (
            [norm.float()] if norm is not None else []
        )
        values = torch.stack(read).tolist()  # the one host sync per log_step
        scalars = {**dict(zip(losses, values)), **self.learning_rates()}
        scalars.update({"grad_norm": values[-1]} if norm is not None else {})
        self.writer.add_scalars("train", scalars, self.global_step)
        if self._bar is not None:
            self._bar.set_postfix({name: f"{scalars[name]:.4f}" for name in losses})
        shown = ", ".join(f"{name}: {scalars[name]:.6f}" for name in losses)
        logger.info("Train epoch %d [%d/%d] %s", epoch, batch_idx + 1, self.len_epoch, shown, extra=FILE_ONLY)

    def _raise_if_nonfinite(self, epoch: int) -> None:
        if self.train_metrics.loss_is_finite():
            self._finite_through = self.progress.batches_in_epoch
            return
        first, last = self._finite_through, max(self.progress.batches_in_epoch - 1, self._finite_through)
        where = f"batch {first}" if first == last else f"batches {first}-{last}"
        raise TrainingError(
            f"non-finite loss at epoch {epoch} {where}; the last good checkpoint is kept "
            "(set trainer.on_nonfinite: skip to skip such steps)"
        )

    def _stop_if_requested(self, agree: bool = True) -> None:
        """Stop after saving when a signal came. Under DDP a signal to any rank stops them all at the same
        step: they agree on logging steps and epoch ends (a collective), never in between."""
        requested = self.stop_request.signal is not None
        if (requested or agree) and distributed.is_distributed():  # else nothing to decide, after most steps
            requested = agree and distributed.any_rank(requested, self.device)
        if not requested:
            return
        path = self.checkpointer.save_last(self.verified_state(), wait=True)
        number = self.stop_request.signal or signal.SIGTERM
        resume = self.commands.resume(path)
        raise TrainingInterrupted(
            128 + number, f"Stopped by {signal.Signals(number).name}; resume with: {resume}"
        )

    # ---- checkpoints ----
    def verified_state(self) -> dict:
        """The checkpoint's state, after checking that no non-finite loss went into the weights since the last
        check (TrainingError if one did: the last good checkpoint must not be replaced)."""
        self._raise_if_nonfinite(self.progress.epoch + 1)
        return self.checkpointer.state_dict()

    def restore(
        self, checkpoint: dict, source: Any, user_data: dict | None = None, allow_inexact: bool = False
    ) -> None:
        """Continue where `checkpoint` stopped (see Checkpointer.restore); call it last before fit()."""
        self.checkpointer.restore(checkpoint, source, user_data, allow_inexact)
        self.resumed = True
