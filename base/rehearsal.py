"""The rehearsal: one real batch of each data section through its pipeline, the models, the losses and the
metrics, before the run directory exists. Config values that validation cannot judge (a transform list
without ToTensor, a crop larger than the images, labels beyond the model's classes) then fail before anything
is written, not in epoch 1 after the run directory, the logs and TensorBoard exist.

It is invisible to the run: every global RNG is put back, the models keep their train/eval flags and their
buffers (evaluation runs in eval mode, under no_grad), the metrics it uses are copies, no DDP collective runs
but the one that agrees on the outcome, and no DataLoader worker is started (the samples load in this
process, as with num_workers: 0).
"""

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from utils import distributed
from utils.errors import ConfigError
from utils.metrics import EpochMetrics, is_stateful
from utils.seeding import rng_state, set_rng_state

from .model_summary import LayerTable


class RehearsalFailure(Exception):
    """Where the rehearsal failed: `stage` is "sample" (loading one sample: the dataset and its transforms),
    "batch" (collating the samples) or "evaluate" (models, losses, metrics); `role` is "training" or
    "validation"; `index` the sample's index in its dataset, where one sample failed. `cause` is the
    exception raised there, `samples` what loaded (for the "batch" stage) and `batch` what collated."""

    def __init__(
        self, stage: str, role: str, cause: BaseException, index: int | None = None, samples: Any = None
    ):
        super().__init__(f"{role} {stage}: {type(cause).__name__}: {cause}")
        self.stage, self.role, self.cause, self.index, self.samples = stage, role, cause, index, samples
        self.batch: Any = None


class RehearsalElsewhere(ConfigError):
    """Another rank's rehearsal failed (that rank says why); this one stops with it, exit 2."""


def rehearse(trainer: Any, summary_depth: int = 0) -> str | None:
    """Pass the first batch of the training and of the validation data through the trainer class's
    `evaluate_models` (what test.py runs; a class without one has its batches loaded only); raise
    RehearsalFailure at the first failure. Under DDP every rank rehearses its own batch, and all stop together
    when one fails. With `summary_depth`, the evaluation model's layer table (base/model_summary.py) of that
    pass is returned."""
    failure, table = None, None
    layers = LayerTable(trainer.unwrapped_model, summary_depth) if summary_depth else None
    try:
        _rehearse(trainer)
    except RehearsalFailure as error:
        failure = error
    finally:
        if layers is not None:
            layers.remove()
            table = layers.table() if layers.shapes else None
    if distributed.any_rank(failure is not None, trainer.device):
        if failure is not None:
            raise failure
        raise RehearsalElsewhere(
            "another rank's rehearsal of its first batch failed (that rank's error says why)"
        )
    return table


def _rehearse(trainer: Any) -> None:
    models = trainer.unwrapped_models
    evaluate = getattr(type(trainer), "evaluate_models", None)  # a BaseTrainer subclass may not have one
    with _unchanged(models.values()), torch.no_grad():
        for role, loader in (("training", trainer.data_loader), ("validation", trainer.valid_data_loader)):
            batch = first_batch(loader, role)
            if batch is None or evaluate is None:
                continue
            try:
                evaluate(
                    models,
                    trainer.eval_name,
                    trainer.criteria,
                    [batch],
                    _local_metrics(trainer),
                    trainer.device,
                    trainer.step.autocast,
                    trainer.options["channels_last"],
                )
            except Exception as error:
                failure = RehearsalFailure("evaluate", role, error)
                failure.batch = batch
                raise failure from error


def _local_metrics(trainer: Any) -> EpochMetrics:
    """Copies of the validation metrics that read this rank's batch alone: no DDP collective (a rank whose
    rehearsal failed makes none), and the run's own metrics untouched. torchmetrics' copies do not sync."""
    metrics = {}
    for name, metric in trainer.metric_ftns.items():
        if is_stateful(metric):
            metric = copy.deepcopy(metric)
            if hasattr(metric, "sync_on_compute"):
                metric.sync_on_compute = False
        metrics[name] = metric
    return EpochMetrics(metrics, trainer.device, tuple(trainer.valid_metrics.loss_names), synced=False)


def first_batch(loader: DataLoader | None, role: str) -> Any:
    """The loader's first batch, loaded sample by sample in this process and collated by its collate_fn;
    None for what has no batches to draw in advance (an IterableDataset, a loader without batch_sampler)."""
    if loader is None or loader.batch_sampler is None or isinstance(loader.dataset, IterableDataset):
        return None
    keys = next(iter(loader.batch_sampler), None)
    if not keys:
        return None
    samples = []
    for key in keys:
        try:
            samples.append(loader.dataset[key])
        except Exception as error:
            index = key[1] if isinstance(key, tuple) else key  # SeededSamples' keys are (pass, index)
            raise RehearsalFailure("sample", role, error, index=index) from error
    try:
        return loader.collate_fn(samples)
    except Exception as error:
        raise RehearsalFailure("batch", role, error, samples=samples) from error


@contextlib.contextmanager
def _unchanged(models: Any) -> Iterator[None]:
    """Every global RNG, each module's train/eval flag and every buffer, as they were before."""
    rngs = rng_state()
    modules: list[nn.Module] = [module for model in models for module in model.modules()]
    flags = [(module, module.training) for module in modules]
    buffers = [(buffer, buffer.detach().clone()) for model in models for buffer in model.buffers()]
    try:
        yield
    finally:
        set_rng_state(rngs)
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
