"""The data sections (data_loader, valid_data_loader, test_data_loader), checked and built in one place.

One rule decides both: a `type` that is a Dataset class is built with its own args and wrapped in a
BaseDataLoader that takes the rest (batch_size, shuffle, validation_split, ...); anything else must be a
DataLoader or return one. A transform list of {type, args} becomes a torchvision Compose.
"""

import inspect
from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset

from base.base_data_loader import BaseDataLoader
from utils.errors import ConfigError

from .config import Config
from .resolution import TRANSFORM_ARGS, Lookup, check_arguments, resolve_type

Checker = Callable[[str], bool]
# torchvision datasets' arguments (a `transforms` list is a loader's own, built by the loader)
COMPOSED_ARGS = ("transform", "target_transform")
EVALUATION_ARGS = {"shuffle": False, "validation_split": 0.0}


def wraps_dataset(obj: Any) -> bool:
    """Whether a data section's type is a Dataset class, to be wrapped in a BaseDataLoader."""
    return inspect.isclass(obj) and issubclass(obj, Dataset) and not issubclass(obj, DataLoader)


def split_loader_args(args: dict) -> tuple[dict, dict]:
    """(dataset args, loader args) of a data section whose `type` is a Dataset: BaseDataLoader's own
    parameters go to the loader that wraps it, the rest to the dataset."""
    loader_keys = set(inspect.signature(BaseDataLoader).parameters) - {"dataset"}
    dataset_args = {key: value for key, value in args.items() if key not in loader_keys}
    return dataset_args, {key: value for key, value in args.items() if key in loader_keys}


def accepts(obj: Any, name: str) -> bool:
    """Whether a data section's type takes argument `name` (a wrapped Dataset: it or its BaseDataLoader)."""
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    if wraps_dataset(obj):
        parameters = {**parameters, **inspect.signature(BaseDataLoader).parameters}
    return name in parameters


def check_loader(
    section: str, obj: Any, args: dict, transforms: Lookup, trusted: Checker, allowed: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(key path, problem) for a data section whose type resolved to `obj`."""
    if wraps_dataset(obj):
        dataset_args, loader_args = split_loader_args(args)
        problems = check_arguments(obj, dataset_args) + check_arguments(BaseDataLoader, loader_args, 1)
    elif inspect.isclass(obj) and not issubclass(obj, DataLoader):
        return [(f"{section}.type", f"{obj.__qualname__} is neither a DataLoader nor a Dataset class")]
    else:
        problems = check_arguments(obj, args)
    errors = [(f"{section}.args.{key}", problem) for key, problem in problems]
    for key in TRANSFORM_ARGS:
        if isinstance(args.get(key), list) and transforms is not None:
            errors += _check_transforms(args[key], f"{section}.args.{key}", transforms, trusted, allowed)
    return errors


def _check_transforms(
    items: list, path: str, lookup: Lookup, trusted: Checker, allowed: tuple[str, ...]
) -> list[tuple[str, str]]:
    errors = []
    for index, item in enumerate(items):
        item_path = f"{path}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("args", {}), dict):
            errors.append((item_path, "must be a mapping with 'type' and optional 'args'"))
            continue
        try:
            obj = resolve_type(item.get("type"), lookup, trusted(f"{item_path}.type"), allowed, "transform")
        except ConfigError as error:
            errors.append((f"{item_path}.type", str(error)))
            continue
        errors += [
            (f"{item_path}.args.{key}", problem)
            for key, problem in check_arguments(obj, item.get("args", {}))
        ]
    return errors


def compose_transforms(items: list[dict], construct: Callable[[int, dict], Any] | None = None) -> Any:
    """A torchvision Compose of a validated list of {type, args}. `construct(index, item)` builds one item
    (the config's factory, with its trust policy); by default a short name from torchvision.transforms."""
    import torchvision.transforms

    def by_name(index: int, item: dict) -> Any:
        return resolve_type(item["type"], torchvision.transforms)(**(item.get("args") or {}))

    return torchvision.transforms.Compose(
        [(construct or by_name)(index, item) for index, item in enumerate(items)]
    )


def build_loader(
    config: Config, key: str, lookup: Lookup, transforms: Lookup, refs: Any = None, **forced: Any
) -> DataLoader:
    """A DataLoader from data section `key`; `forced` args (shuffle: false, ...) apply where the type takes
    them; `refs` resolves `${...}` arguments."""
    node = config[key]
    obj = config.resolve(f"{key}.type", node["type"], lookup)
    args = {**(node.get("args") or {}), **{k: v for k, v in forced.items() if accepts(obj, k)}}
    args = refs.substitute(args, f"{key}.args") if refs is not None else args
    for name in COMPOSED_ARGS:
        if isinstance(args.get(name), list):
            path = f"{key}.args.{name}"
            args[name] = compose_transforms(
                args[name],
                lambda index, item, path=path: config.construct(
                    f"{path}[{index}]", item["type"], item.get("args") or {}, transforms
                ),
            )
    if wraps_dataset(obj):
        dataset_args, loader_args = split_loader_args(args)
        dataset = config.construct(key, node["type"], dataset_args, lookup)
        return BaseDataLoader(dataset, **{"seed": config["seed"], **loader_args})
    loader = config.construct(key, node["type"], args, lookup)
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            config.located(
                f"{key}.type", f"{node['type']} returned {type(loader).__name__}, not a DataLoader"
            )
        )
    return loader


def has_validation(data: dict, lookup: Lookup) -> bool:
    """Whether the run will have validation data: a section, a split, or a split_validation() override."""
    if data.get("valid_data_loader"):
        return True
    args = data["data_loader"].get("args") or {}
    if args.get("validation_split") not in (None, 0, 0.0):
        return True
    try:
        loader = resolve_type(data["data_loader"]["type"], lookup)
    except ConfigError:
        return False
    own_split = getattr(loader, "split_validation", None)
    if own_split is not None and own_split is not BaseDataLoader.split_validation:
        return True
    try:
        parameter = inspect.signature(loader).parameters.get("validation_split")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default not in (parameter.empty, None, 0, 0.0)


def build_validation_loader(
    config: Config, train_loader: DataLoader, lookup: Lookup, transforms: Lookup, refs: Any = None
) -> DataLoader | None:
    """The valid_data_loader section, else the training loader's split_validation(), else None."""
    if config["valid_data_loader"]:
        return build_loader(config, "valid_data_loader", lookup, transforms, refs, **EVALUATION_ARGS)
    split = getattr(train_loader, "split_validation", None)
    return split() if callable(split) else None


def test_split(config: Config, lookup: Lookup) -> str | None:
    """Where test.py finds test data: the test_data_loader section, else data_loader with pytorch-template's
    `training=False` (or torchvision's `train=False`); None when neither exists."""
    if config["test_data_loader"]:
        return "test_data_loader"
    loader_type = config.resolve("data_loader.type", config["data_loader"]["type"], lookup)
    split = next((name for name in ("training", "train") if accepts(loader_type, name)), None)
    return f"data_loader with {split}=False" if split else None


def build_test_loader(
    config: Config, lookup: Lookup, transforms: Lookup, refs: Any = None
) -> tuple[DataLoader, str]:
    """test.py's data, in a fixed order and whole, and where it came from (see test_split)."""
    split = test_split(config, lookup)
    if split is None:
        raise ConfigError(
            f"{config.source}: data_loader.type: {config['data_loader']['type']} takes no `training` "
            "or `train` argument to select test data: add a test_data_loader section"
        )
    if split == "test_data_loader":
        return build_loader(config, "test_data_loader", lookup, transforms, refs, **EVALUATION_ARGS), split
    argument = split.split()[-1].split("=")[0]
    return build_loader(
        config, "data_loader", lookup, transforms, refs, **EVALUATION_ARGS, **{argument: False}
    ), split
