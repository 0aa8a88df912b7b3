"""Everything a run needs, built from a validated Config: model, data, loss and metrics, optimizer, schedule.

`lookups()` is the one place that says where a short `type` name is found: add your module here when you add
one (model/nets.py, data_loader/audio.py). Each section kind's rules live in parse_config (loaders.py,
callables.py, schedulers.py); the functions here only put them together.
"""

import os
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torchvision.transforms
from torch import nn
from torch.utils.data import DataLoader, Subset

import data_loader.data_loaders as module_data
import model.loss as module_loss
import model.metric as module_metric
import model.model as module_arch
import trainer.trainer as module_trainer
from base.base_data_loader import BaseDataLoader, unseeded
from base.base_model import init_weights
from base.schedule import Schedule
from base.train_step import compiled, unwrap
from logger.report import Commands
from parse_config import Config, callables
from parse_config.loaders import build_loader, build_test_loader, build_validation_loader, test_split
from parse_config.references import References, needs_data
from parse_config.resolution import close_match
from parse_config.schedulers import build_schedule
from parse_config.shapes import Entry, entries, eval_model_name, optimized_models
from parse_config.validation import needs_trust
from utils import distributed, fast_defaults
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
        "trainer": module_trainer,
    }


def build_model(config: Config, name: str | None = None, refs: References | None = None) -> nn.Module:
    """One model (by default the one test.py evaluates), with its `init` scheme applied."""
    entry = next(e for e in entries(config.data, "model") if e.name == (name or eval_model_name(config.data)))
    model = config.build(entry.path, lookup=lookups()["arch"], refs=refs)
    if entry.node.get("init"):
        init_weights(model, entry.node["init"])
    return model


def build_models(config: Config, refs: References | None = None) -> dict[str, nn.Module]:
    """Every model by name (`model` for a single `arch`); references then know them as `model` and
    `models.<name>`."""
    models = {entry.name: build_model(config, entry.name, refs) for entry in entries(config.data, "model")}
    if refs is not None:
        refs.add(model=models[eval_model_name(config.data)], models=SimpleNamespace(**models))
    return models


def init_from(models: dict[str, nn.Module], config: Config) -> dict[str, dict[str, int]]:
    """Load each model's `init_from` matching weights into a new run; the counts of what was loaded."""
    counts = {}
    for entry in entries(config.data, "model"):
        spec = entry.node.get("init_from")
        if spec:
            state_dict = load_state_dict_file(spec["path"])
            counts[entry.path] = load_matching_weights(
                models[entry.name],
                state_dict,
                spec["path"],
                spec.get("strict", False),
                spec.get("exclude", []),
            )
    return counts


def fast_options(
    options: dict[str, Any], device: torch.device, models: list[nn.Module]
) -> tuple[dict[str, Any], list[str]]:
    """The trainer options with each `auto` speed setting decided for this device and these models, and the
    header's list of what `auto` chose and why (utils/fast_defaults.py)."""
    precision = fast_defaults.choose_precision(options["precision"], device)
    channels_last = fast_defaults.choose_channels_last(options["channels_last"], device, models)
    benchmark = fast_defaults.cudnn_benchmark(device, options["deterministic"])
    saves = fast_defaults.choose_background_saves(options["background_saves"], device)
    host_memory = fast_defaults.choose_host_memory(options["reuse_host_memory"])
    choices = {
        "precision": precision,
        "channels_last": channels_last,
        "background_saves": saves,
        "reuse_host_memory": host_memory,
    }
    speed = fast_defaults.described({**choices, "cudnn.benchmark": benchmark})
    chosen = {name: choice.value for name, choice in choices.items()}
    return {**options, **chosen}, [speed] if speed else []


def place_model(model: nn.Module, device: torch.device, options: dict[str, Any]) -> nn.Module:
    """On the device (channels_last if asked), then DDP when distributed, then compiled when asked: compile
    wraps the DDP model."""
    model = model.to(device, memory_format=torch.channels_last if options["channels_last"] else None)
    if distributed.is_distributed():
        if options["sync_batchnorm"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [device.index] if device.index is not None else None
        unused = options["find_unused_parameters"]
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=unused
        )
    return compiled(model, options["compile"]) if options["compile"] else model


def build_losses(config: Config, refs: References | None = None) -> dict[str, Callable]:
    """Every loss by name (`loss` for a single `loss`)."""
    found = lookups()["loss"]
    return {
        entry.name: callables.build_callable(config, entry.path, entry.node, found, refs)
        for entry in entries(config.data, "loss")
    }


def loss_and_metrics(config: Config) -> tuple[Callable, dict[str, Callable]]:
    """The (single) loss and the metrics by their logged names."""
    return next(iter(build_losses(config).values())), build_metrics(config)


def build_metrics(config: Config, refs: References | None = None) -> dict[str, Callable]:
    """The metrics by their logged names."""
    return callables.build_metrics(config, lookups()["metrics"], refs)


def build_data(config: Config, refs: References | None = None) -> tuple[DataLoader, DataLoader | None]:
    """The training loader and the validation loader (None without validation data), then known to
    references as `data_loader`, `dataset` (the loader's own, inside torchkiln's seeding) and
    `valid_data_loader`."""
    found = lookups()
    train = build_loader(config, "data_loader", found["data_loader"], found["transforms"], refs)
    if refs is not None:
        refs.add(data_loader=train, dataset=unseeded(train.dataset))
    valid = build_validation_loader(config, train, found["data_loader"], found["transforms"], refs)
    if refs is not None:
        refs.add(valid_data_loader=valid)
    return train, valid


def global_batches(loader: DataLoader, seed: int) -> DataLoader:
    """The training samples in batches of batch_size x the number of processes, shuffled by the run's seed:
    what one DDP step sees over all ranks (the LR range test on rank 0); the loader itself in one process."""
    if not distributed.is_distributed():
        return loader
    indices = getattr(loader.sampler, "indices", None)
    samples = Subset(unseeded(loader.dataset), indices) if indices is not None else unseeded(loader.dataset)
    generator = torch.Generator().manual_seed(seed)
    size = (loader.batch_size or 1) * distributed.world_size()
    return DataLoader(
        samples, batch_size=size, shuffle=True, generator=generator, num_workers=loader.num_workers
    )


def overfit_data(loader: DataLoader, batches: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """`trainer.overfit_batches`: the first `batches` batches of the training order, as a training loader
    over them alone (in a fixed order) and a validation loader over the same samples: a model that cannot
    fit them has a bug."""
    rngs = torch.get_rng_state()  # a plain DataLoader's sampler draws from torch's RNG
    order = [key[1] if isinstance(key, tuple) else key for key in loader.sampler]
    torch.set_rng_state(rngs)
    samples = Subset(unseeded(loader.dataset), order[: batches * (loader.batch_size or 1)])
    settings = {"batch_size": loader.batch_size, "shuffle": False, "num_workers": loader.num_workers}
    return BaseDataLoader(samples, seed=seed, **settings), BaseDataLoader(samples, seed=seed, **settings)


def test_data(config: Config, refs: References | None = None) -> tuple[DataLoader, str]:
    """test.py's loader, and which section it comes from. The training data is built first only when a
    reference needs it (a loss weighted by the training labels, a model sized by its classes)."""
    found = lookups()
    if refs is not None and needs_data(config.data):
        build_data(config, refs)
    return build_test_loader(config, found["data_loader"], found["transforms"], refs)


def has_test_data(config: Config) -> bool:
    """Whether test.py can find test data in this config (else it needs a test_data_loader section)."""
    return test_split(config, lookups()["data_loader"]) is not None


def build_optimizers(
    config: Config,
    models: dict[str, nn.Module],
    refs: References | None = None,
    device: torch.device | None = None,
    speed: list[str] | None = None,
) -> dict[str, torch.optim.Optimizer]:
    """Every optimizer by name (`optimizer` for a single one), over the trainable parameters of the models
    (or submodules, or parameter groups) it names; with fused kernels on CUDA where the optimizer has them
    (the choice is added to `speed`, the header's list)."""
    optimizers = {}
    for entry in entries(config.data, "optimizer"):
        kernels = fast_defaults.Choice({}, "")
        if device is not None:
            optimizer_class = config.resolve(f"{entry.path}.type", entry.node["type"], torch.optim)
            kernels = fast_defaults.optimizer_kernels(optimizer_class, entry.node.get("args") or {}, device)
        if kernels.value and speed is not None:
            speed.append(f"{entry.path} fused ({kernels.reason})")
        groups = _parameter_groups(config, entry, models)
        optimizers[entry.name] = config.build(
            entry.path, groups, lookup=torch.optim, refs=refs, **kernels.value
        )
    if refs is not None:
        refs.add(optimizer=next(iter(optimizers.values())), optimizers=SimpleNamespace(**optimizers))
    return optimizers


def _parameter_groups(config: Config, entry: Entry, models: dict[str, nn.Module]) -> list[dict[str, Any]]:
    groups, grouped = [], "param_groups" in entry.node
    for index, (model_name, module_path, hyperparameters) in enumerate(optimized_models(config.data, entry)):
        module = unwrap(models[model_name])
        if module_path:
            names = [name for name, _ in module.named_modules() if name]
            if module_path not in names:
                key = f"{entry.path}.param_groups[{index}].module" if grouped else f"{entry.path}.module"
                hint = close_match(module_path, names)
                problem = f"{type(module).__name__} has no submodule '{module_path}'{hint}"
                raise ConfigError(config.located(key, problem))
            module = module.get_submodule(module_path)
        groups.append({"params": [p for p in module.parameters() if p.requires_grad], **hyperparameters})
    return groups


def build_lr_schedules(
    config: Config,
    optimizers: dict[str, torch.optim.Optimizer],
    loader: DataLoader,
    refs: References | None = None,
) -> dict[str, Schedule]:
    """Each scheduler and when it steps, by the name of the optimizer it steps."""
    steps = -(-batches_per_epoch(config, loader) // config.trainer["accumulate_grad_batches"])
    found = lookups()
    return {
        entry.name: build_schedule(
            config, entry, optimizers[entry.name], steps, found["lr_scheduler"], found["data_loader"], refs
        )
        for entry in entries(config.data, "scheduler")
    }


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


def commands_for(config: Config, project: dict[str, Any]) -> Commands:
    """How to run this project's scripts again, as pasted: under the same launcher, with the flag a resume
    from its checkpoint needs when its config names code a checkpoint may not (a file.py type, a package
    outside the project), and the new-run form for a schedule fixed to the run's length."""
    launcher = "python"
    if distributed.launched_by_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = distributed.world_size() // local
        launcher = f"torchrun --nproc_per_node {local}" + (
            f" --nnodes {nodes} <rendezvous options>" if nodes > 1 else ""
        )
    flags = " --trust-checkpoint-config" if needs_trust(config.data, lookups(), project) else ""
    schedules = entries(config.data, "scheduler")
    fixed = next((e.path for e in schedules if e.node["type"].split(".")[-1] == "OneCycleLR"), None)
    evaluated = next(e.path for e in entries(config.data, "model") if e.name == eval_model_name(config.data))
    return Commands(f"{launcher} train.py", f"{launcher} test.py", flags, fixed, evaluated)
