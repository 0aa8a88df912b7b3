"""Train from a config: python train.py -c configs/mnist.yaml [key.path=value ...]; resume with -r."""
import logging
import os
import sys
from types import ModuleType
from typing import Callable

import torch
import yaml
from torch import nn

import data_loader.data_loaders as module_data
import model.loss as module_loss
import model.metric as module_metric
import model.model as module_arch
from base.base_model import init_weights
from logger import setup_logging
from parse_config import TRANSFORMS_KEY, Config, metric_name, parse_args
from trainer import Trainer
from utils.checkpoint import load_matching_weights, load_state_dict_file
from utils.device import prepare_device
from utils.errors import ConfigError, TrainingError, TrainingInterrupted
from utils.seeding import seed_everything, set_determinism

logger = logging.getLogger("train")


def lookups() -> dict[str, ModuleType]:
    """Where each section's short `type` names are looked up."""
    return {"arch": module_arch, "data_loader": module_data, "optimizer": torch.optim,
            "lr_scheduler": torch.optim.lr_scheduler, "loss": module_loss, "metrics": module_metric,
            TRANSFORMS_KEY: module_data.tv_transforms}


def build_model(config: Config) -> nn.Module:
    model = config.build("arch", lookup=module_arch)
    if config["arch"].get("init"):
        init_weights(model, config["arch"]["init"])
    return model


def loss_and_metrics(config: Config) -> tuple[Callable, dict[str, Callable]]:
    criterion = config.resolve("loss", config["loss"], module_loss)
    metrics = {metric_name(name): config.resolve("metrics", name, module_metric) for name in config["metrics"]}
    return criterion, metrics


def _init_from(model: nn.Module, spec: dict) -> dict[str, int]:
    state_dict = load_state_dict_file(spec["path"])
    return load_matching_weights(model, state_dict, spec["path"], spec.get("strict", False), spec.get("exclude", []))


def build_trainer(config: Config) -> tuple[Trainer, dict[str, int] | None]:
    """Every object the run needs. Reads files only, so a bad config still leaves nothing behind."""
    seed_everything(config["seed"])
    set_determinism(config.trainer["deterministic"])
    device, device_ids = prepare_device(config["n_gpu"])
    train_loader = config.build("data_loader", lookup=module_data)
    model = build_model(config)
    init_from = config["arch"].get("init_from")
    init_counts = _init_from(model, init_from) if init_from and config.checkpoint is None else None
    model = model.to(device)
    if len(device_ids) > 1:
        model = nn.DataParallel(model, device_ids=device_ids)
    criterion, metrics = loss_and_metrics(config)
    optimizer = config.build("optimizer", [p for p in model.parameters() if p.requires_grad], lookup=torch.optim)
    scheduler = None
    if config["lr_scheduler"]:
        scheduler = config.build("lr_scheduler", optimizer, lookup=torch.optim.lr_scheduler)
    trainer = Trainer(model, criterion, metrics, optimizer, config.trainer, device, train_loader,
                      train_loader.split_validation(), scheduler, config.run_dir, config.log_dir, config.data)
    if config.checkpoint is not None:
        _restore(trainer, config)
    return trainer, init_counts


def _restore(trainer: Trainer, config: Config) -> None:
    """Resume; when fine-tuning with another optimizer or scheduler type, start that one fresh."""
    previous = config.checkpoint.get("config") or {}
    same = {key: (previous.get(key) or {}).get("type") == (config[key] or {}).get("type")
            for key in ("optimizer", "lr_scheduler")}
    for key, kept in same.items():
        if not kept:
            logger.warning("%s type changed since the checkpoint: its state starts fresh", key)
    trainer.restore(config.checkpoint, config.checkpoint_path, same["optimizer"], same["lr_scheduler"])


def _prepare_run_directory(config: Config) -> None:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.yaml").write_text(yaml.safe_dump(config.data, sort_keys=False))
    setup_logging(config.log_dir, config.trainer["verbosity"])


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 training failed, 2 bad input (nothing written), 128+N stopped by signal N."""
    try:
        config = parse_args(argv, lookups(), "Train a model from a YAML or JSON config.")
        if config.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        if config.device_ids is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = config.device_ids
        trainer, init_counts = build_trainer(config)
        _prepare_run_directory(config)
        logger.info("%s\nRun directory: %s", trainer.unwrapped_model, config.run_dir)
        if init_counts is not None:
            logger.info("init_from %s: %s", config["arch"]["init_from"]["path"], init_counts)
        if config.checkpoint is not None:
            logger.info("Resuming from %s: epoch %d, batch %d", config.checkpoint_path, trainer.completed_epochs + 1,
                        trainer.batches_in_epoch)
        trainer.fit()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        logger.warning("%s", stop)
        return stop.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
