"""The checkpoint's one owner: what it holds (named parts), when it is written, how a loaded one is checked,
and how it is restored (the fine-tuning policy is base/fine_tuning.py's). The file format itself is
utils/checkpoint.py's.

A part is anything with state_dict() and load_state_dict(): a model, an optimizer, a schedule, the train step,
the metrics, the data stream. Most are stored under their name; the progress record, the monitor and the
RNGs are stored flat, as they have been since the first format (and `state_dict`, `epoch`, `config` keep
pytorch-template's meaning). Two models are two named entries, not a second code path.
"""

import functools
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from logger import FILE_ONLY
from utils import distributed
from utils.checkpoint import (
    CONFIG,
    FORMAT_VERSION,
    WEIGHTS,
    Staged,
    check_fields,
    discard,
    exact_parts_intact,
    is_legacy,
    progress_of,
    publish,
    stage_checkpoint,
    stage_second_name,
    sync_directory,
)
from utils.errors import CheckpointError, ConfigError, TrainingError
from utils.seeding import rng_state
from utils.weights import check_optimizer_fits, load_model_state

from .background_saves import BackgroundSaves
from .base_data_loader import BatchStream
from .fine_tuning import apply_changed_args, fresh_parts, part_key, tuned
from .progress import Progress

logger = logging.getLogger(__name__)
LAST = "checkpoint-last.pth"
BEST = "model_best.pth"
EMA_WEIGHTS = "ema_state_dict"


def run_parts(
    models: dict[str, nn.Module],
    eval_name: str,
    ema_model: nn.Module | None,
    step: Any,
    optimizers: dict[str, Any],
    schedules: dict[str, Any],
    metrics: Any,
    stream: BatchStream,
) -> dict[str, Any]:
    """The run's named parts. The model test.py evaluates is `state_dict` (pytorch-template's meaning), any
    other under `models.<name>`; its EMA is `ema_state_dict`. The single optimizer and scheduler are
    `optimizer` and `lr_scheduler`, named ones `optimizers.<name>` and `lr_schedulers.<name>`."""
    parts = {WEIGHTS: models[eval_name], **{f"models.{n}": m for n, m in models.items() if n != eval_name}}
    parts.update({EMA_WEIGHTS: ema_model, "step": step})
    parts.update({part_key("optimizer", name): optimizer for name, optimizer in optimizers.items()})
    schedulers = {part_key("lr_scheduler", name): schedule for name, schedule in schedules.items()}
    parts.update(schedulers or {"lr_scheduler": None})
    return {**parts, "metrics": metrics, "data_order": stream}


def eval_weights(checkpoint: Mapping[str, Any]) -> dict:
    """The weights test.py and export evaluate: the EMA's when the run kept one."""
    return checkpoint[checkpoint.get("eval_weights", WEIGHTS)]


def model_weights(checkpoint: Mapping[str, Any], name: str, eval_name: str) -> dict:
    """The weights of model `name` as test.py evaluates them: the evaluation model's eval_weights."""
    return eval_weights(checkpoint) if name == eval_name else checkpoint[f"models.{name}"]


def describe_checkpoint(checkpoint: Mapping[str, Any]) -> str:
    """Where a checkpoint stands and which weights test.py evaluates, for its header."""
    weights = "EMA weights" if checkpoint.get("eval_weights") == EMA_WEIGHTS else "trained weights"
    if is_legacy(checkpoint):
        return f"pytorch-template checkpoint of epoch {checkpoint.get('epoch')}, {weights}"
    position = f"epoch {checkpoint['epoch']}" + (
        f" + {checkpoint['batches_in_epoch']} batches" if checkpoint.get("batches_in_epoch") else ""
    )
    return f"{position}, step {checkpoint.get('global_step')}, {weights}"


class Checkpointer:
    """Epoch files every `save_period` (newest `keep_last` kept), model_best.pth on improvement, and
    checkpoint-last.pth every `save_every_steps` optimizer steps or when a signal stops training. `flat`
    parts store their fields at the top level; `config` is the run's config, stored as the record of it.
    With `background_saves` the files are written on a thread, in order, while training goes on; without,
    they are written before training goes on and only synced and renamed on that thread. flush() waits for
    them. OPTIONS are the trainer options it takes."""

    OPTIONS = ("save_period", "keep_last", "save_every_steps", "background_saves")

    def __init__(
        self,
        parts: dict[str, Any],
        flat: list[Any],
        config: dict,
        save_period: int = 1,
        keep_last: int = 0,
        save_every_steps: int = 0,
        background_saves: bool = False,
    ):
        self.parts, self.flat, self.config = parts, flat, config
        self.save_period, self.keep_last, self.save_every_steps = save_period, keep_last, save_every_steps
        self.saves = BackgroundSaves(background_saves)  # every file operation, in order
        self.run_dir: Path | None = None  # set when the run directory is claimed: nothing is written before
        self._newest: tuple[Path, tuple[int, int, int]] | None = None  # the last epoch file, and its progress
        self._durable: set[Path] = set()  # epoch files whose names a directory sync made durable
        self.exporter: Any = None  # the config's `export:` block (base/export_job.py), told of each new best
        # under DDP every rank builds the state (it gathers), rank 0 writes
        self.writes = distributed.is_main()

    # ---- what a checkpoint holds ----
    def state_dict(self) -> dict:
        """Every part as plain data: what makes `--resume` continue bit for bit."""
        model = self.parts[WEIGHTS]
        state = {
            "version": FORMAT_VERSION,
            "arch": type(model).__name__,
            "eval_weights": EMA_WEIGHTS if self.parts.get(EMA_WEIGHTS) is not None else WEIGHTS,
        }
        state.update(
            {key: part.state_dict() if part is not None else None for key, part in self.parts.items()}
        )
        for part in self.flat:
            state.update(part.state_dict())
        return {**state, CONFIG: self.config}

    # ---- when it is written ----
    def save_epoch(self, make_state: Callable[[], dict], epoch: int, improved: bool) -> None:
        if epoch % self.save_period and not improved:
            return
        state = make_state()
        if self.writes:
            self.saves.submit(self._write_epoch, state, epoch, improved)

    def _write_epoch(self, state: dict, epoch: int, improved: bool) -> Callable[[], None]:
        """Serialize the epoch file (and model_best.pth, as a second name for it when both are due); returns
        what is left, which waits on the disk."""
        path = self.run_dir / f"checkpoint-epoch{epoch}.pth" if epoch % self.save_period == 0 else None
        staged: list[Staged] = []
        try:
            if path is not None:
                staged.append(stage_checkpoint(state, path))
            if improved:  # a second name for the epoch file's bytes rather than a second serialization
                staged.append(stage_second_name(staged[0] if staged else None, state, self.run_dir / BEST))
        except BaseException:
            discard(staged)
            raise
        return functools.partial(self._publish_epoch, staged, path, progress_of(state), improved)

    def _publish_epoch(
        self, staged: list[Staged], path: Path | None, progress: tuple[int, int, int], improved: bool
    ) -> None:
        publish(staged)
        if path is not None:
            self._newest = (path, progress)
            logger.info("Saved %s", path, extra=FILE_ONLY)
        if improved:
            logger.info("Saved %s (best so far)", self.run_dir / BEST, extra=FILE_ONLY)
            if self.exporter is not None:
                self.exporter.best_saved(self.run_dir / BEST)
        if path is not None:
            self._prune()

    def maybe_save_step(self, make_state: Callable[[], dict], global_step: int) -> None:
        if self.save_every_steps and global_step % self.save_every_steps == 0:
            self.save_last(make_state())

    def save_last(self, state: dict, wait: bool = False) -> Path:
        """checkpoint-last.pth: a second name for the newest epoch file when it holds this very state (the end
        of a run), else a file of its own. `wait`: return once it is on disk (a stop, the end of a run)."""
        path = self.run_dir / LAST
        if self.writes:
            self.saves.submit(self._write_last, state, path)
        if wait:
            self.flush()
        return path

    def _write_last(self, state: dict, path: Path) -> Callable[[], None]:
        newest, at = self._newest or (None, None)
        same = newest is not None and newest.exists() and at == progress_of(state)
        return functools.partial(publish, [stage_second_name(newest if same else None, state, path)])

    def flush(self) -> None:
        """Wait until the checkpoints asked for are on disk; a failed write (a full disk) is raised here."""
        self.saves.wait()

    def settle(self) -> None:
        """flush() while another error ends the run: the write in progress completes, and its own failure is
        logged rather than raised over the error that ends the run."""
        try:
            self.saves.wait()
        except TrainingError as error:
            logger.error("%s", error)
        except OSError as error:  # pruning or the export job, on the saving thread
            logger.error("while finishing the checkpoints' files: %s", error)

    def _prune(self) -> None:
        if not self.keep_last:
            return
        epoch_of = {
            p: int(re.fullmatch(r"checkpoint-epoch(\d+)\.pth", p.name).group(1))
            for p in self.run_dir.glob("checkpoint-epoch*.pth")
            if re.fullmatch(r"checkpoint-epoch(\d+)\.pth", p.name)
        }
        ordered = sorted(epoch_of, key=epoch_of.get)
        doomed, kept = ordered[: -self.keep_last], ordered[-self.keep_last :]
        if doomed and self._durable.isdisjoint(kept):
            # a crash must not keep the deletions and lose every kept file's name: one is made durable first
            sync_directory(self.run_dir)
            self._durable = set(ordered)
        for path in doomed:
            path.unlink()

    # ---- how it is restored ----
    def restore(
        self, checkpoint: dict, source: Path, user_data: dict | None = None, allow_inexact: bool = False
    ) -> None:
        """Continue where `checkpoint` stopped. Call it last before training: it sets the global RNGs. Every
        field is checked before anything is loaded, so that a bad file is one line and nothing is written.
        Fine-tuning (`user_data` is what the user's own config says): an optimizer or scheduler whose type
        changed starts fresh; an argument the user changed replaces the checkpoint's, with a log line."""
        if is_legacy(checkpoint):
            raise ConfigError(
                f"{source}: a pytorch-template checkpoint holds weights but no training state to "
                f"resume; start a run from its weights with arch.init_from.path={source}"
            )
        optimizers = [key for key, part in self.parts.items() if isinstance(part, torch.optim.Optimizer)]
        counters = Progress.COUNTERS
        check_fields(checkpoint, source, allow_inexact, tuple(optimizers), counters)
        previous = checkpoint.get(CONFIG) or {}
        fresh = fresh_parts(self.parts, previous, self.config)
        loaded = {
            key: part
            for key, part in self.parts.items()
            if part is not None and key not in fresh and checkpoint.get(key) is not None
        }
        for key, part in loaded.items():
            if isinstance(part, nn.Module):
                load_model_state(part, checkpoint[key], source)
        checkpoint = _exact_or_restarted(checkpoint, source, allow_inexact)
        try:
            for key, part in loaded.items():
                if isinstance(part, torch.optim.Optimizer):
                    check_optimizer_fits(checkpoint[key], part, source)
                if not isinstance(part, nn.Module):
                    part.load_state_dict(checkpoint[key])
                if isinstance(part, BatchStream):
                    part.resume_samples = self._samples_done(checkpoint, part)
            for part in self.flat:
                part.load_state_dict(checkpoint)
        except CheckpointError:  # it names the file already
            raise
        except ConfigError as error:  # a part that cannot take this state, saying why
            raise CheckpointError(f"{source}: {error}") from None
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(
                f"{source}: cannot resume from it: {type(error).__name__}: {error}"
            ) from None
        for key in filter(tuned, loaded):
            apply_changed_args(self.parts, key, previous, user_data or {})

    def _samples_done(self, checkpoint: Mapping[str, Any], stream: BatchStream) -> int | None:
        """Samples of the pass already trained, when the checkpoint's global batch differs from this run's."""
        previous = checkpoint.get("world_size", 1)
        sampler = getattr(stream.loader, "sampler", None)
        if previous == distributed.world_size() or not hasattr(sampler, "global_batch"):
            return None
        batch = ((checkpoint.get(CONFIG) or {}).get("data_loader", {}).get("args") or {}).get("batch_size")
        return stream.batches_done * previous * (batch or sampler.batch_size)


def _exact_or_restarted(checkpoint: dict, source: Path, allow_inexact: bool) -> dict:
    """The checkpoint, or under --allow-inexact-resume one that restarts its epoch with fresh RNGs when its
    RNG or data-order state is missing."""
    if not allow_inexact or exact_parts_intact(checkpoint):
        return checkpoint
    logger.warning(
        "%s: its RNG or data-order state is missing: continuing inexactly (--allow-inexact-resume), "
        "from the start of epoch %d",
        source,
        checkpoint["epoch"] + 1,
    )
    return {
        **checkpoint,
        "rng": rng_state(),
        "batches_in_epoch": 0,
        "data_order": {"pass": checkpoint["epoch"], "batches_done": 0},
    }
