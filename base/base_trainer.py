"""BaseTrainer: the mechanics around the per-batch loop that users don't need to edit."""
import copy
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from logger import FILE_ONLY, TensorboardWriter
from utils.checkpoint import FORMAT_VERSION, load_model_state
from utils.checkpoint_check import EXACT_RESUME_PARTS, part_ok, check_fields, check_optimizer_fits
from utils.device import batch_to_device
from utils.errors import CheckpointError, TrainingError, TrainingInterrupted
from utils.metrics import EpochMetrics, is_stateful
from utils import distributed
from utils.seeding import rng_state, seed_everything, set_rng_state
from utils.signals import StopRequest

from .base_data_loader import BatchStream, derived_seed
from .checkpointer import Checkpointer
from .monitor import Monitor
from .train_step import TrainStep, unwrap
from .report import describe_data, epoch_line, flat_hparams, parameter_counts, run_header, run_summary, shown_path

logger = logging.getLogger(__name__)


class BaseTrainer:
    """Epochs, validation, LR scheduling, monitoring, early stop, checkpoints and exact resume.
    Subclasses implement `_train_epoch` and `_valid_epoch` and call the helpers below from them."""

    def __init__(self, model: nn.Module, criterion: Callable, metric_ftns: dict[str, Callable],
                 optimizer: torch.optim.Optimizer, options: dict[str, Any], device: torch.device,
                 data_loader: DataLoader, valid_data_loader: Any = None, lr_scheduler: Any = None,
                 run_dir: Path = Path("."), log_dir: Path = Path("."), config: dict | None = None):
        self.model, self.criterion, self.metric_ftns = model, criterion, metric_ftns
        self.optimizer, self.lr_scheduler, self.device = optimizer, lr_scheduler, device
        self.data_loader, self.valid_data_loader = data_loader, valid_data_loader
        self.options, self.log_dir, self.config = options, Path(log_dir), config or {}
        self.epochs, self.log_step = options["epochs"], options["log_step"]
        self.len_epoch = options["len_epoch"] or len(data_loader)
        self.step = TrainStep(model, device, options["precision"], options["accumulate_grad_batches"],
                              self.len_epoch, options["clip_grad_norm"], options["clip_grad_value"],
                              (options["ema"] or {}).get("decay"))
        self.batches = BatchStream(data_loader)
        self.monitor = Monitor(options["monitor"], options["early_stop"])
        self.checkpointer = Checkpointer(run_dir, options["save_period"], options["keep_last"],
                                         options["save_every_steps"])
        self.train_metrics = EpochMetrics(metric_ftns, device)
        self.valid_metrics = EpochMetrics({name: copy.deepcopy(metric) if is_stateful(metric) else metric
                                           for name, metric in metric_ftns.items()}, device)
        self.stop_request = StopRequest()
        self.global_step, self.skipped_steps = 0, 0
        self.completed_epochs, self.batches_in_epoch = 0, 0  # where training stands: what a resume restores
        self._resumed, self._window_skipped, self._finite_through = False, False, 0
        self._show_progress = options["progress_bar"] and sys.stderr.isatty() and distributed.is_main()
        self._bar: tqdm | None = None
        self.writer = TensorboardWriter(self.log_dir, enabled=False)  # a no-op until fit() opens the real one

    def set_run_directories(self, run_dir: Path, log_dir: Path) -> None:
        """Where checkpoints and logs go, once the run directory is claimed."""
        self.checkpointer.run_dir, self.log_dir = Path(run_dir), Path(log_dir)

    def header(self, name: str, run_id: str, source: str) -> str:
        """The lines that introduce a run: its data, length, device, model and where everything goes."""
        valid = self.valid_data_loader
        rows = {
            "config": source,
            "data": f"{describe_data('train', self.data_loader)}; {describe_data('valid', valid)}",
            "length": f"{self.epochs} epochs x {self.step.steps_per_epoch()} steps = "
                      f"{self.epochs * self.step.steps_per_epoch()} optimizer steps"
                      + (f" of {self.step.accumulate} batches" if self.step.accumulate > 1 else ""),
            "device": f"{self.device}, precision {self.options['precision']}; workers {self.data_loader.num_workers}, "
                      f"pin_memory {str(self.data_loader.pin_memory).lower()}",
            "model": parameter_counts(self.unwrapped_model),
            "monitor": (f"{self.monitor.mode} {self.monitor.metric} (* marks a new best)" if self.monitor.metric
                        else "off: model_best.pth is not written"),
            "run dir": shown_path(self.checkpointer.run_dir),
            "log dir": f"{shown_path(self.log_dir)} (info.log, metrics.csv"
                       f"{', TensorBoard' if self.options['tensorboard'] else ''})",
        }
        if distributed.is_distributed():
            rows["processes"] = (f"{distributed.world_size()} (DDP) x batch {self.data_loader.batch_size} = "
                                 f"global batch {distributed.world_size() * self.data_loader.batch_size}")
        return run_header(f"Run {name}/{run_id}", rows)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    # ---- the epoch loop ----
    def fit(self) -> None:
        """Train to `epochs`; a signal stops after the current step with checkpoint-last.pth written."""
        purge_step = self.global_step + 1 if self._resumed else None  # drop what a killed run logged later
        main = distributed.is_main()  # rank 0 writes; every rank computes
        self.writer = TensorboardWriter(self.log_dir, self.options["tensorboard"] and main, purge_step,
                                        csv_enabled=main)
        self.writer.add_run_description(yaml.safe_dump(self.config, sort_keys=False), self.train_metrics.names)
        started, log = time.monotonic(), {}
        try:
            with self.stop_request, logging_redirect_tqdm():
                for epoch in range(self.completed_epochs + 1, self.epochs + 1):
                    log = self._epoch(epoch)
                    if self.monitor.should_stop:
                        logger.info("%s did not improve for %d epochs: stopping early.",
                                    self.monitor.metric, self.monitor.early_stop)
                        break
            self.checkpointer.save_last(self.state())  # the final state, whatever save_period
            self._finish(time.monotonic() - started, log)
        finally:
            self.writer.close()

    def _epoch(self, epoch: int) -> dict[str, float]:
        """Train and validate one epoch, then log it, step the scheduler and save what is due."""
        started = time.monotonic()
        log = {"epoch": epoch, "lr": self.learning_rate, **self._train_epoch(epoch)}
        if self.valid_data_loader is not None:
            log.update({f"val_{k}": v for k, v in self._valid_epoch(epoch).items()})
        self._raise_if_nonfinite(epoch)
        self._step_scheduler_per_epoch(log)
        improved = self.monitor.update(log)
        self._log_epoch(log, time.monotonic() - started, improved)
        self.completed_epochs, self.batches_in_epoch = epoch, 0
        self.checkpointer.save_epoch(self.state, epoch, improved)
        self._stop_if_requested()
        return log

    def _finish(self, seconds: float, log: dict[str, float]) -> None:
        final = {key: value for key, value in log.items() if key != "epoch"}
        self.writer.add_hparams(flat_hparams(self.config), final, self.global_step)
        logger.info("%s", run_summary(seconds, self.completed_epochs, self.monitor.should_stop, self.monitor,
                                      self.checkpointer.run_dir, self.log_dir, self.options["tensorboard"]))

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _step_scheduler_per_epoch(self, log: dict[str, float]) -> None:
        if self.lr_scheduler is None or self.options["lr_step"] != "epoch":
            return
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step(log[self.config["lr_scheduler"]["monitor"]])
        else:
            self.lr_scheduler.step()

    def _log_epoch(self, log: dict[str, float], seconds: float, improved: bool) -> None:
        logger.info("%s", epoch_line(log["epoch"], self.epochs, log, seconds, improved))
        self.writer.add_scalars("epoch", {k: v for k, v in log.items() if k != "epoch"}, self.global_step)
        if self.options["tensorboard_histograms"]:
            self.writer.add_histograms(self.unwrapped_model, self.global_step)

    # ---- helpers for the per-batch loop ----
    def _train_batches(self, epoch: int) -> Iterator[tuple[int, Any]]:
        """(batch index, batch) for this epoch; a resumed epoch continues at its next batch."""
        start = self._finite_through = self.batches_in_epoch
        if start == 0:
            self.train_metrics.reset()
        with tqdm(total=self.len_epoch, initial=start, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                  disable=not self._show_progress, dynamic_ncols=True) as self._bar:
            for batch_idx in range(start, self.len_epoch):
                batch = next(self.batches)
                self.step.batch_weight = self.batches.weight
                yield batch_idx, batch
                self._bar.update()

    def to_device(self, data: Any, target: Any) -> tuple[Any, Any]:
        """A batch on the training device; image batches in channels_last when the model is."""
        return batch_to_device(data, target, self.device, self.options["channels_last"])

    def _record(self, epoch: int, batch_idx: int, loss: torch.Tensor, output: Any, target: Any) -> None:
        """Add the batch to the epoch's metrics. `on_nonfinite: stop` costs nothing here: the loss sum the
        metrics keep turns non-finite with any loss and is checked at the next read-back, before any save;
        `skip` must look at every loss (a host sync) and drops the window's step."""
        if self.options["on_nonfinite"] == "skip" and not torch.isfinite(loss):
            skipped = self.skipped_steps + (not self._window_skipped)
            self._window_skipped = True
            logger.warning("Non-finite loss at epoch %d batch %d: step skipped (%d so far)", epoch, batch_idx, skipped)
            return
        self.train_metrics.update(loss, output, target)

    def _skip_window(self) -> bool:
        skipped, self._window_skipped = self._window_skipped, False
        self.skipped_steps += skipped
        return skipped

    def _raise_if_nonfinite(self, epoch: int) -> None:
        if self.train_metrics.loss_is_finite():
            self._finite_through = self.batches_in_epoch
            return
        first, last = self._finite_through, max(self.batches_in_epoch - 1, self._finite_through)
        where = f"batch {first}" if first == last else f"batches {first}-{last}"
        raise TrainingError(f"non-finite loss at epoch {epoch} {where}; the last good checkpoint is kept "
                            "(set trainer.on_nonfinite: skip to skip such steps)")

    def _after_step(self, epoch: int, batch_idx: int, data: torch.Tensor, loss: torch.Tensor) -> None:
        """Side concerns of one optimizer step: scheduler, logging, step checkpoints, signals."""
        self.global_step += 1
        self.batches_in_epoch = batch_idx + 1
        if self.lr_scheduler is not None and self.options["lr_step"] == "batch":
            self.lr_scheduler.step()
        if self.global_step % self.log_step == 0:
            self._log_step(epoch, batch_idx, loss)
        if batch_idx == 0 and self.options["tensorboard_images"]:
            self.writer.add_image_grid("input", data, self.global_step)
        self.checkpointer.maybe_save_step(self.state, self.global_step)
        self._stop_if_requested(agree=self.global_step % self.log_step == 0)

    def _log_step(self, epoch: int, batch_idx: int, loss: torch.Tensor) -> None:
        self._raise_if_nonfinite(epoch)
        norm = self.step.grad_norm
        read = [loss.detach().float()] + ([norm.float()] if norm is not None else [])
        value, *grad_norm = torch.stack(read).tolist()  # the one host sync per log_step
        scalars = {"loss": value, "lr": self.learning_rate, **dict(zip(["grad_norm"], grad_norm))}
        self.writer.add_scalars("train", scalars, self.global_step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{value:.4f}")
        logger.info("Train epoch %d [%d/%d] loss: %.6f", epoch, batch_idx + 1, self.len_epoch, value, extra=FILE_ONLY)

    def _stop_if_requested(self, agree: bool = True) -> None:
        """Stop after saving when a signal came. Under DDP a signal to any rank stops them all at the same
        step: they agree on logging steps and epoch ends (a collective), never in between."""
        requested = self.stop_request.signal is not None
        if distributed.is_distributed():
            if not agree:
                return
            requested = distributed.any_rank(requested, self.device)
        if not requested:
            return
        path = self.checkpointer.save_last(self.state())
        number = self.stop_request.signal or signal.SIGTERM
        raise TrainingInterrupted(128 + number, f"Stopped by {signal.Signals(number).name}; resume with: "
                                                f"python train.py --resume {path}")

    # ---- checkpoints ----
    @property
    def unwrapped_model(self) -> nn.Module:
        return unwrap(self.model)

    def state(self) -> dict:
        """Everything that makes `--resume` continue bit for bit, as plain data."""
        self._raise_if_nonfinite(self.completed_epochs + 1)
        return {
            "version": FORMAT_VERSION,
            "arch": type(self.unwrapped_model).__name__,
            "epoch": self.completed_epochs,
            "batches_in_epoch": self.batches_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "state_dict": self.unwrapped_model.state_dict(),  # the weights training continues from
            "ema_state_dict": self.step.ema.module.state_dict() if self.step.ema is not None else None,
            "eval_weights": "ema_state_dict" if self.step.ema is not None else "state_dict",  # what test.py uses
            "step": self.step.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "monitor_best": self.monitor.best,
            "monitor_best_epoch": self.monitor.best_epoch,
            "not_improved_count": self.monitor.not_improved,
            "metrics": self.train_metrics.state_dict(),
            "data_order": self.batches.state_dict(),
            "rng": rng_state(),
            "rng_per_rank": distributed.gather(rng_state()) if distributed.is_distributed() else None,
            "world_size": distributed.world_size(),
            "config": self.config,
        }

    def apply_hyperparameter(self, section: str, name: str, value: Any) -> None:
        """Fine-tuning: a hyperparameter the config changed wins over the one restored from the checkpoint."""
        if section == "optimizer" and all(name in group for group in self.optimizer.param_groups):
            for group in self.optimizer.param_groups:
                group[name] = value
                if name == "lr" and "initial_lr" in group:  # what a scheduler scales from
                    group["initial_lr"] = value
            if name == "lr" and hasattr(self.lr_scheduler, "base_lrs"):
                self.lr_scheduler.base_lrs = [value] * len(self.optimizer.param_groups)
        elif section == "lr_scheduler" and hasattr(self.lr_scheduler, name):
            setattr(self.lr_scheduler, name, value)
        else:
            logger.warning("Fine-tuning: %s.args.%s cannot be changed on a restored %s; it keeps the checkpoint's "
                           "value", section, name, section)

    def _previous_global_batch(self, checkpoint: dict) -> int | None:
        """The samples per step the checkpoint was written with, when the world size changed since."""
        previous = checkpoint.get("world_size", 1)
        sampler = getattr(self.data_loader, "sampler", None)
        if previous == distributed.world_size() or not hasattr(sampler, "global_batch"):
            return None
        batch = ((checkpoint.get("config") or {}).get("data_loader", {}).get("args") or {}).get("batch_size")
        return previous * (batch or sampler.batch_size)

    def _restore_rng(self, checkpoint: dict) -> None:
        """Each rank continues its own RNG stream; with another world size the streams cannot continue, so
        they are derived anew from the seed, the step and the rank (the log says so, once)."""
        previous = checkpoint.get("world_size", 1)
        if previous == distributed.world_size():
            per_rank = checkpoint.get("rng_per_rank")
            set_rng_state(per_rank[distributed.rank()] if per_rank else checkpoint["rng"])
            return
        logger.warning("Resuming %d processes from a checkpoint of %d: the data continues at the next unseen "
                       "sample, but the run cannot be bit-identical (reductions run in another order); RNGs are "
                       "derived anew from the seed and step", distributed.world_size(), previous)
        step_and_rank = checkpoint["global_step"] * 4096 + distributed.rank()
        seed_everything(derived_seed(self.config.get("seed", 0), step_and_rank))

    def restore(self, checkpoint: dict, source: Path, keep_optimizer: bool = True, keep_scheduler: bool = True,
                allow_inexact: bool = False) -> None:
        """Continue where `checkpoint` stopped. Call it last before fit(): it sets the global RNGs. Every field
        is checked first, so that a bad file is one line and nothing is written."""
        check_fields(checkpoint, source, allow_inexact)
        load_model_state(self.unwrapped_model, checkpoint["state_dict"], source)
        if self.step.ema is not None and checkpoint.get("ema_state_dict") is not None:
            load_model_state(self.step.ema.module, checkpoint["ema_state_dict"], source)
        if allow_inexact and not all(part_ok(key, checkpoint.get(key)) for key in EXACT_RESUME_PARTS):
            logger.warning("%s: its RNG or data-order state is missing: continuing inexactly "
                           "(--allow-inexact-resume), from the start of epoch %d", source, checkpoint["epoch"] + 1)
            checkpoint = {**checkpoint, "rng": rng_state(), "batches_in_epoch": 0,
                          "data_order": {"pass": checkpoint["epoch"], "batches_done": 0}}
        try:
            if keep_optimizer:
                check_optimizer_fits(checkpoint["optimizer"], self.optimizer, source)
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            if keep_scheduler and self.lr_scheduler is not None and checkpoint.get("lr_scheduler"):
                self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            self.monitor.best, self.monitor.not_improved = checkpoint["monitor_best"], checkpoint["not_improved_count"]
            self.monitor.best_epoch = checkpoint.get("monitor_best_epoch")
            self.train_metrics.load_state_dict(checkpoint["metrics"], self.device)
            self.batches.load_state_dict(checkpoint["data_order"], self._previous_global_batch(checkpoint))
            self.completed_epochs, self.batches_in_epoch = checkpoint["epoch"], checkpoint["batches_in_epoch"]
            self.global_step, self.skipped_steps = checkpoint["global_step"], checkpoint["skipped_steps"]
            self.step.load_state_dict(checkpoint.get("step") or {}, checkpoint.get("ema_state_dict"))
            self._restore_rng(checkpoint)
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{source}: cannot resume from it: {type(error).__name__}: {error}") from None
        self._resumed = True
