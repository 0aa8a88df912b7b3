"""Everything a run needs, built from a validated Config: model, data, loss and metrics, optimizer, schedule.

`lookups()` is the one place that says where a short `type` name is found: add your module here when you add
one (model/nets.py, data_loader/audio.py). Each section kind's rules live in parse_config (loaders.py,
callables.py, schedulers.py); the functions here only put them together.
"""

from typing import Any, Callable

import torch
import torchvision.transforms
from torch import nn
from torch.utils.data import DataLoader

import data_loader.data_loaders as module_data
import model.loss as module_loss
import model.metric as module_metric
import model.model as module_arch
from base.base_model import init_weights
from base.schedule import Schedule
from base.train_step import compiled
from parse_config import Config
from parse_config.callables import build_callable, build_metrics
from parse_config.loaders import build_loader, build_test_loader, build_validation_loader
from parse_config.schedulers import build_schedule
from utils import distributed
from utils.checkpoint import load_state_dict_file
from utils.errors import ConfigError
from utils.weights import load_matching_weights


def lookups() -> dict[str, Any]:
    """Where each section's short `type` names are looked up, first match first."""
    return {
        "arch": module_arch,
        "data_loader": module_data,
        "optimizer": torch.optim,
        "lr_scheduler": torch.optim.lr_scheduler,
        "loss": (module_loss, torch.nn),
        "metrics": module_metric,
        "transforms": torchvision.transforms,
    }


def build_model(config: Config) -> nn.Module:
    """The `arch` section, with its `init` scheme applied."""
    model = config.build("arch", lookup=lookups()["arch"])
    if config["arch"].get("init"):
        init_weights(model, config["arch"]["init"])
    return model


def init_from(model: nn.Module, config: Config) -> dict[str, int] | None:
    """Load `arch.init_from`'s matching weights into a new run's model; the counts of what was loaded."""
    spec = config["arch"].get("init_from")
    if not spec:
        return None
    state_dict = load_state_dict_file(spec["path"])
    return load_matching_weights(
        model, state_dict, spec["path"], spec.get("strict", False), spec.get("exclude", [])
    )


def place_model(model: nn.Module, device: torch.device, options: dict[str, Any]) -> nn.Module:
    """On the device (channels_last if asked), then DDP when distributed, then compiled when asked: compile
    wraps the DDP model."""
    model = model.to(device, memory_format=torch.channels_last if options["channels_last"] else None)
    if distributed.is_distributed():
        if options["sync_batchnorm"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
    return compiled(model, options["compile"]) if options["compile"] else model


def loss_and_metrics(config: Config) -> tuple[Callable, dict[str, Callable]]:
    """The loss and the metrics by their logged names."""
    found = lookups()
    return build_callable(config, "loss", config["loss"], found["loss"]), build_metrics(
        config, found["metrics"]
    )


def build_data(config: Config) -> tuple[DataLoader, DataLoader | None]:
    """The training loader and the validation loader (None without validation data)."""
    found = lookups()
    train = build_loader(config, "data_loader", found["data_loader"], found["transforms"])
    return train, build_validation_loader(config, train, found["data_loader"], found["transforms"])


def test_data(config: Config) -> DataLoader:
    """test.py's loader."""
    found = lookups()
    return build_test_loader(config, found["data_loader"], found["transforms"])


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters."""
    return config.build("optimizer", [p for p in model.parameters() if p.requires_grad], lookup=torch.optim)


def build_lr_schedule(
    config: Config, optimizer: torch.optim.Optimizer, loader: DataLoader
) -> Schedule | None:
    """The LR scheduler and when it steps, or None without an lr_scheduler section."""
    if not config["lr_scheduler"]:
        return None
    batches = batches_per_epoch(config, loader)
    steps = -(-batches // config.trainer["accumulate_grad_batches"])
    return build_schedule(config, optimizer, steps, lookups()["lr_scheduler"], lookups()["data_loader"])


def batches_per_epoch(config: Config, loader: DataLoader) -> int:
    if config.trainer["len_epoch"]:
        return config.trainer["len_epoch"]
    try:
        return len(loader)
    except TypeError:
        raise ConfigError(
            f"{config.source}: trainer.len_epoch: the training loader has no length (an "
            "IterableDataset?); set len_epoch to the batches per epoch"
        ) from None
