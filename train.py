"""Train from a config: python train.py -c configs/mnist.yaml [key.path=value ...]; resume with -r."""
import inspect
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision.transforms
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

import data_loader.data_loaders as module_data
import model.loss as module_loss
import model.metric as module_metric
import model.model as module_arch
from base import BaseDataLoader
from base.base_data_loader import split_loader_args
from base.base_model import init_weights
from base.train_step import check_precision, compile_failure, compiled
from base.config_validation import PER_BATCH_SCHEDULERS, PLATEAU, callable_spec, metric_name, scheduler_monitor
from logger import FILE_ONLY, buffer_early_records, flush_early_records, setup_logging
from parse_config import Config, parse_args
from trainer import Trainer
from trainer import options as project_options
from utils import distributed, user_code
from utils.checkpoint import load_matching_weights, load_state_dict_file
from utils.device import prepare_device
from utils.errors import ConfigError, TrainingError, TrainingInterrupted
from utils.seeding import seed_everything, set_determinism

logger = logging.getLogger("train")
COMPOSED_TRANSFORM_ARGS = ("transform", "target_transform")


def lookups() -> dict[str, Any]:
    """Where each section's short `type` names are looked up, first match first."""
    return {"arch": module_arch, "data_loader": module_data, "optimizer": torch.optim,
            "lr_scheduler": torch.optim.lr_scheduler, "loss": (module_loss, torch.nn), "metrics": module_metric,
            "transforms": torchvision.transforms}


def build_model(config: Config) -> nn.Module:
    model = config.build("arch", lookup=module_arch)
    if config["arch"].get("init"):
        init_weights(model, config["arch"]["init"])
    return model


def build_callable(config: Config, path: str, spec: str | dict, lookup: Any) -> Callable:
    """A loss or metric: a class is instantiated once with its args; a function is called per batch with its args."""
    name, args = callable_spec(spec)
    obj = config.resolve(f"{path}.type" if isinstance(spec, dict) else path, name, lookup)
    if inspect.isclass(obj):
        return config.construct(path, name, args, lookup)
    return (lambda output, target: obj(output, target, **args)) if args else obj


def loss_and_metrics(config: Config) -> tuple[Callable, dict[str, Callable]]:
    criterion = build_callable(config, "loss", config["loss"], lookups()["loss"])
    metrics = {metric_name(spec): build_callable(config, f"metrics[{index}]", spec, module_metric)
               for index, spec in enumerate(config["metrics"])}
    return criterion, metrics


def build_loader(config: Config, key: str, **forced: Any) -> DataLoader:
    """A DataLoader from a data section: a DataLoader type is built with its args; a Dataset type with its own
    args, wrapped in a BaseDataLoader with the rest (batch_size, shuffle, validation_split, ...)."""
    node = config[key]
    obj = config.resolve(f"{key}.type", node["type"], module_data)
    args = {**(node.get("args") or {}), **{k: v for k, v in forced.items() if accepts(obj, k)}}
    for name in COMPOSED_TRANSFORM_ARGS:  # torchvision datasets' arguments; a `transforms` list is the loader's own
        if isinstance(args.get(name), list):
            args[name] = torchvision.transforms.Compose([
                config.construct(f"{key}.args.{name}[{index}]", item["type"], item.get("args") or {},
                                 torchvision.transforms) for index, item in enumerate(args[name])])
    if inspect.isclass(obj) and issubclass(obj, Dataset) and not issubclass(obj, DataLoader):
        dataset_args, loader_args = split_loader_args(args)
        dataset = config.construct(key, node["type"], dataset_args, module_data)
        return BaseDataLoader(dataset, **{"seed": config["seed"], **loader_args})
    loader = config.construct(key, node["type"], args, module_data)
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"{config.source}: {key}.type: {node['type']} returned {type(loader).__name__}, "
                          "not a DataLoader")
    return loader


def accepts(obj: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    if inspect.isclass(obj) and issubclass(obj, Dataset) and not issubclass(obj, DataLoader):
        parameters = {**parameters, **inspect.signature(BaseDataLoader).parameters}
    return name in parameters


def validation_loader(config: Config, train_loader: DataLoader) -> DataLoader | None:
    """The valid_data_loader section, else the training loader's split_validation(), else None."""
    if config["valid_data_loader"]:
        return build_loader(config, "valid_data_loader", shuffle=False, validation_split=0.0)
    split = getattr(train_loader, "split_validation", None)
    return split() if callable(split) else None


def batches_per_epoch(config: Config, loader: DataLoader) -> int:
    if config.trainer["len_epoch"]:
        return config.trainer["len_epoch"]
    try:
        return len(loader)
    except TypeError:
        raise ConfigError(f"{config.source}: trainer.len_epoch: the training loader has no length (an "
                          "IterableDataset?); set len_epoch to the batches per epoch") from None


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """The LR scheduler; a per-batch schedule's length is checked against the run's before anything is written."""
    node = config["lr_scheduler"]
    name = node["type"].split(".")[-1]
    if name == PLATEAU:
        node["monitor"] = scheduler_monitor(config.data, lookups())[1]
    if name in PER_BATCH_SCHEDULERS and config.trainer["lr_step"] == "epoch":
        logger.warning("%s is a per-batch schedule but trainer.lr_step is epoch: it will step %d times, once per "
                       "epoch; set trainer.lr_step: batch to step it every batch", name, config.trainer["epochs"])
    if name == "OneCycleLR":
        _check_one_cycle(config, steps)
    return config.build("lr_scheduler", optimizer, lookup=torch.optim.lr_scheduler)


def _check_one_cycle(config: Config, steps: int) -> None:
    args = config["lr_scheduler"].setdefault("args", {})
    per_batch = config.trainer["lr_step"] == "batch"
    run_steps = config.trainer["epochs"] * (steps if per_batch else 1)
    length = f"{config.trainer['epochs']} epochs" + (f" x {steps} optimizer steps" if per_batch else "")
    if args.get("total_steps") == "auto" or ("total_steps" not in args and "epochs" not in args):
        args.update(total_steps=run_steps)
        args.pop("epochs", None), args.pop("steps_per_epoch", None)
        return
    given = args.get("total_steps") or args.get("epochs", 0) * (args.get("steps_per_epoch") or 1)
    if given != run_steps:
        key = "total_steps" if "total_steps" in args else "epochs"
        raise ConfigError(f"{config.source}: lr_scheduler.args.{key}: OneCycleLR would run {given} steps but this "
                          f"run takes {run_steps} ({length}); set total_steps: auto")


def _init_from(model: nn.Module, spec: dict) -> dict[str, int]:
    state_dict = load_state_dict_file(spec["path"])
    return load_matching_weights(model, state_dict, spec["path"], spec.get("strict", False), spec.get("exclude", []))


def build_trainer(config: Config) -> tuple[Trainer, dict[str, int] | None]:
    """Every object the run needs. Reads files only, so a bad config still leaves nothing behind."""
    seed_everything(config["seed"])
    set_determinism(config.trainer["deterministic"])
    device, _ = prepare_device(config["n_gpu"])
    train_loader = build_loader(config, "data_loader")
    valid_loader = validation_loader(config, train_loader)
    model = build_model(config)
    init_from = config["arch"].get("init_from")
    init_counts = _init_from(model, init_from) if init_from and config.checkpoint is None else None
    check_precision(config.trainer["precision"], device)
    model = model.to(device, memory_format=torch.channels_last if config.trainer["channels_last"] else None)
    if distributed.is_distributed():  # wrapped after it is moved; compile wraps the DDP model
        if config.trainer["sync_batchnorm"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                    else None)
    if config.trainer["compile"]:
        model = compiled(model, config.trainer["compile"])
    criterion, metrics = loss_and_metrics(config)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    optimizer = config.build("optimizer", [p for p in model.parameters() if p.requires_grad], lookup=torch.optim)
    scheduler = None
    if config["lr_scheduler"]:
        batches = batches_per_epoch(config, train_loader)
        scheduler = build_scheduler(config, optimizer, -(-batches // config.trainer["accumulate_grad_batches"]))
    trainer = Trainer(model, criterion, metrics, optimizer, config.trainer, device, train_loader,
                      valid_loader, scheduler, config.run_dir, config.log_dir, config.data)
    if config.checkpoint is not None:
        _restore(trainer, config)
    return trainer, init_counts


def _restore(trainer: Trainer, config: Config) -> None:
    """Resume; when fine-tuning with another optimizer or scheduler type, start that one fresh, and apply
    hyperparameters the user changed over the checkpoint's."""
    if config.checkpoint.get("legacy"):
        raise ConfigError(f"{config.checkpoint_path}: a pytorch-template checkpoint holds weights but no training "
                          f"state to resume; start a run from its weights with arch.init_from.path="
                          f"{config.checkpoint_path}")
    previous = config.checkpoint.get("config") or {}
    same = {key: (previous.get(key) or {}).get("type") == (config[key] or {}).get("type")
            for key in ("optimizer", "lr_scheduler")}
    for key, kept in same.items():
        if not kept:
            logger.warning("%s type changed since the checkpoint: its state starts fresh", key)
    trainer.restore(config.checkpoint, config.checkpoint_path, same["optimizer"], same["lr_scheduler"],
                    config.allow_inexact)
    for key in ("optimizer", "lr_scheduler"):
        if same[key]:
            for name, old, new in changed_args(previous, config, key):
                logger.info("Fine-tuning: %s.args.%s is %r in the checkpoint, %r now: using %r", key, name, old, new,
                            new)
                trainer.apply_hyperparameter(key, name, new)


def changed_args(previous: dict, config: Config, key: str) -> list[tuple[str, Any, Any]]:
    """(name, checkpoint's value, config's value) for each arg of `key` the user set to a new value."""
    old_args = (previous.get(key) or {}).get("args") or {}
    given = ((config.user_data.get(key) or {}).get("args") or {})
    return [(name, old_args.get(name), value) for name, value in given.items() if old_args.get(name) != value]


def claim_run_directory(config: Config) -> None:
    """Create the run directory atomically, so two runs never share one: a timestamp id that another run
    took gets a suffix (_2, _3, ...); an existing directory is only reused by resuming its own checkpoint.
    Under DDP rank 0 decides and every rank gets its answer."""
    problem = None
    if distributed.is_main():
        try:
            _claim(config)
        except ConfigError as error:
            problem = str(error)
    config.run_id, problem = distributed.broadcast((config.run_id, problem))
    if problem:
        raise ConfigError(problem)


def _claim(config: Config) -> None:
    if config.checkpoint_path is not None and config.checkpoint_path.parent.resolve() == config.run_dir.resolve():
        return
    try:
        config.run_dir.parent.mkdir(parents=True, exist_ok=True)
        Path(config.trainer["save_dir"], "log").mkdir(exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{config.source}: trainer.save_dir: cannot write under '{config.trainer['save_dir']}' "
                          f"({error.strerror or error}); choose a writable directory") from None
    first_choice = config.run_id
    for suffix in itertools.count(2):
        try:
            config.run_dir.mkdir()
            return
        except FileExistsError:
            if config.explicit_run_id:
                raise ConfigError(f"--run-id {first_choice}: {config.run_dir} already exists; choose another id, "
                                  f"or continue that run with --resume {config.run_dir}") from None
            config.run_id = f"{first_choice}_{suffix}"


def resolved_settings(config: Config, trainer: Trainer) -> dict[str, Any]:
    """What `auto` and the device check turned into, written to config.yaml beside what was asked for."""
    loaders = {"data_loader": trainer.data_loader, "valid_data_loader": trainer.valid_data_loader}
    return {"device": str(trainer.device),
            **{key: {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                     "persistent_workers": loader.persistent_workers}
               for key, loader in loaders.items() if loader is not None}}


def _start_run(config: Config, trainer: Trainer, early: Any) -> None:
    claim_run_directory(config)
    trainer.set_run_directories(config.run_dir, config.log_dir)
    if distributed.is_main():
        config.log_dir.mkdir(parents=True, exist_ok=True)
        resolved = {**config.data, "resolved": resolved_settings(config, trainer)}
        (config.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    setup_logging(config.log_dir, config.trainer["verbosity"], early, main=distributed.is_main())


def _log_start(config: Config, trainer: Trainer, init_counts: dict[str, int] | None) -> None:
    for notice in config.notices:
        logger.warning("%s", notice)
    logger.info("%s", trainer.unwrapped_model, extra=FILE_ONLY)
    logger.info("%s", trainer.header(config["name"], config.run_id, config.source))
    if not trainer.batches.exact:
        logger.info("data_loader %s is not a BaseDataLoader: resuming inside an epoch re-reads the batches "
                    "already trained on, and is exact when its order and worker seeds come from torch's global "
                    "RNG (a DataLoader without persistent_workers)", config["data_loader"]["type"])
    if init_counts is not None:
        logger.info("init_from %s: %s", config["arch"]["init_from"]["path"], init_counts)
    if config.checkpoint is not None:
        logger.info("Resuming from %s: epoch %d, batch %d", config.checkpoint_path, trainer.completed_epochs + 1,
                    trainer.batches_in_epoch)


def finished(config: Config) -> str | None:
    """Why resuming this checkpoint would train nothing, with how to train longer; None if it would."""
    checkpoint = config.checkpoint
    if checkpoint is None or checkpoint.get("legacy"):
        return None
    run = config.checkpoint_path.parent
    early_stop = config.trainer["early_stop"]
    if early_stop and checkpoint.get("not_improved_count", 0) >= early_stop:
        return (f"{config.checkpoint_path}: this run stopped early at epoch {checkpoint['epoch']} ({early_stop} epochs "
                f"without improvement). To train on: python train.py --resume {run} trainer.early_stop=0")
    if checkpoint["epoch"] >= config.trainer["epochs"] and checkpoint["batches_in_epoch"] == 0:
        return (f"{config.checkpoint_path}: this run is finished ({checkpoint['epoch']} of {config.trainer['epochs']} "
                f"epochs). To train longer: python train.py --resume {run} "
                f"trainer.epochs={checkpoint['epoch'] + config.trainer['epochs']}")
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 training failed or the user's code raised, 2 bad input (nothing written),
    128+N stopped by signal N."""
    early = buffer_early_records()
    try:
        config = parse_args(argv, lookups(), "Train a model from a YAML or JSON config.",
                            project_options.PROJECT_OPTIONS)
        if config.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        if config.device_ids is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = config.device_ids
        if config["n_gpu"] > 1 and torch.cuda.device_count() > 1 and not distributed.launched_by_torchrun():
            return distributed.launch_local_processes(min(config["n_gpu"], torch.cuda.device_count()),
                                                      sys.argv[1:] if argv is None else argv)
        distributed.init_process_group(use_cuda=config["n_gpu"] > 0 and torch.cuda.is_available())
        trainer, init_counts = build_trainer(config)  # checks the checkpoint fits, writing nothing
        if finished(config):
            if distributed.is_main():
                print(finished(config))
            return 0
        _start_run(config, trainer, early)
        _log_start(config, trainer, init_counts)
        trainer.fit()
    except ConfigError as error:
        if distributed.env_rank() == 0:  # every rank finds the same error: say it once
            print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        logger.error("%s", error, extra=FILE_ONLY)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        logger.warning("%s", stop)
        return stop.exit_status
    except Exception as error:  # raised in the user's model, dataset, loss or metric: show their frames
        logger.error("The run crashed", exc_info=error, extra=FILE_ONLY)
        one_line = compile_failure(error) or user_code.worker_death(error)
        print(f"error: {one_line}" if one_line else user_code.describe(error), file=sys.stderr)
        return 1
    finally:
        flush_early_records(early)
        distributed.destroy_process_group()
    return 0


def exit_after(status: int) -> None:
    """Exit with `status`. A failed run (1) has said its one line and closed its files; it leaves without
    Python's teardown, where the threads of DataLoader workers that died can still print tracebacks."""
    if status == 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    exit_after(main())
