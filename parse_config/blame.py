"""Which config key a failure is about: a library refusing an argument while the config's objects are built,
or the rehearsal (base/rehearsal.py) failing on one real batch. A failure that a config key explains is a
ConfigError naming it (exit 2); one in the user's own code keeps its frames (exit 1), with a note saying that
nothing was written and which config value may be the cause.
"""

import re
import traceback
from types import TracebackType
from typing import TYPE_CHECKING, Any

from utils.errors import ConfigError
from utils.user_code import is_user_file, raised_in_library, raised_in_user_code

from .resolution import Lookup
from .shapes import entries, eval_model_name

if TYPE_CHECKING:  # config.py uses blamed_key
    from .config import Config

REHEARSED = (
    "found before the run began, by passing one real batch through the data, models, losses and metrics"
)
_OUT_OF_BOUNDS = re.compile(r"Target (-?\d+) is out of bounds")
_NOT_BATCHABLE = "end the transform list with {type: ToTensor} (Normalize goes after it)"


def leaves(args: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, value) of every value in a nested args mapping; `type` names are not values, and a list of
    plain values is one value (`translate: [0.1, 0.1]`)."""
    if isinstance(args, dict):
        items = [
            (f"{prefix}.{key}" if prefix else str(key), value) for key, value in args.items() if key != "type"
        ]
    elif isinstance(args, list):
        items = [(f"{prefix}[{index}]", value) for index, value in enumerate(args)]
    else:
        return [(prefix, args)]
    found = []
    for path, value in items:
        nested = isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value)
        )
        found += leaves(value, path) if nested else [(path, value)]
    return found


def blamed_key(error: BaseException, args: dict) -> str | None:
    """The one arg (a key path below `args`) that the error is about, if it can be told: the value the
    failing library code received (by identity), else the arg the message names, else the value it quotes."""
    found = leaves(args)
    message = str(error)
    received = _received_ids(error.__traceback__)
    by_identity = [path for path, value in found if _has_identity(value) and id(value) in received]
    quoted_types = set(re.findall(r"'(\w+)'", message))
    if len(by_identity) > 1:  # a TypeError quoting 'str' among numbers: the string is the odd one
        typed = [path for path, value in found if path in by_identity and type(value).__name__ == "str"]
        by_identity = typed if "str" in quoted_types and len(typed) == 1 else by_identity
    by_name = [path for path, _ in found if _names(message, _last_key(path))]
    by_value = [
        path
        for path, value in found
        if isinstance(value, (int, float, str))
        and not isinstance(value, bool)
        and re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message)
    ]
    for candidates in (by_identity, by_name, by_value):
        if len(candidates) == 1:
            return candidates[0]
    for narrowing in (by_name, by_value):  # several values received: the one the message names
        both = [path for path in by_identity if path in narrowing]
        if len(both) == 1:
            return both[0]
    return None


def download_failure(error: BaseException) -> str | None:
    """The one-line reason when a dataset failed to download its files (no network, a refused host), else
    None: torchvision's messages span lines and end in the socket error."""
    text = str(error)
    found = re.search(r"urlopen error \[Errno -?\d+\] ([^>\]]+)|urlopen error ([^>]+)>", text)
    if found:
        return (found.group(1) or found.group(2)).strip()
    if "Error downloading" in text or type(error).__name__ in ("URLError", "HTTPError", "gaierror"):
        return text.strip().splitlines()[0]
    return None


def _has_identity(value: Any) -> bool:
    """Whether `value is` tells this config value apart: ints, bools and None are shared objects."""
    return value is not None and not isinstance(value, (bool, int))


def _received_ids(trace: TracebackType | None) -> set[int]:
    """The ids of the local values of the innermost frames that are not the user's code: what the library
    that raised was given."""
    frames = [frame for frame, _ in traceback.walk_tb(trace)]
    received: set[int] = set()
    for frame in reversed(frames):
        if is_user_file(frame.f_code.co_filename):
            break
        for value in frame.f_locals.values():
            received.add(id(value))
            if isinstance(value, (tuple, list)):
                received.update(id(item) for item in value)
    return received


def _last_key(path: str) -> str:
    return re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]


def _names(message: str, key: str) -> bool:
    """Whether the message names the key, or a word of its stem (`translate` in "translation values")."""
    if len(key) <= 4:
        return re.search(rf"\b{re.escape(key)}\b", message) is not None
    return re.search(rf"\b{re.escape(key[: max(4, len(key) - 2)])}\w*", message) is not None


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def explain_rehearsal(config: "Config", failure: Any, lookups: dict[str, Lookup]) -> BaseException:
    """The error to show for a RehearsalFailure: a ConfigError naming the config key that explains it, else
    the exception raised in the user's code, noted with what the rehearsal was and the value suspected."""
    section = (
        "valid_data_loader" if failure.role == "validation" and config["valid_data_loader"] else "data_loader"
    )
    suspect = ""
    where = f"sample {failure.index} of the {failure.role} data" if failure.index is not None else ""
    cause = failure.cause
    if failure.stage == "sample":
        blamed = _blamed_transform(config, section, cause, where)
        if blamed is not None:
            return blamed
        if not raised_in_user_code(cause):
            return ConfigError(config.located(section, f"loading {where} failed: {_reason(cause)}"))
    elif failure.stage == "batch" and not raised_in_user_code(cause):
        if _holds_pil_image(failure.samples):
            transforms = next(
                (f".args.{k}" for k in ("transforms", "transform") if _args(config, section).get(k)), ""
            )
            problem = (
                f"the {failure.role} samples are PIL images, which a batch cannot hold: {_NOT_BATCHABLE}"
            )
            return ConfigError(config.located(section + transforms, problem))
        hint = (
            " (give every sample one shape, e.g. with a Resize transform, or a collate_fn)"
            if "size" in str(cause)
            else ""
        )
        return ConfigError(
            config.located(section, f"the {failure.role} samples cannot be batched: {_reason(cause)}{hint}")
        )
    elif failure.stage == "evaluate":
        labels = _OUT_OF_BOUNDS.search(str(cause))
        if labels:
            return _labels_beyond_classes(
                config, failure.role, _largest_label(failure.batch, int(labels.group(1)))
            )
        suspect = _suspected_value(config, cause, lookups)
        if isinstance(suspect, ConfigError):
            return suspect
    cause.add_note(f"({REHEARSED}; nothing was written{suspect})")
    return cause


def _args(config: "Config", section: str) -> dict:
    return (config[section] or {}).get("args") or {}


def _blamed_transform(config: "Config", section: str, cause: BaseException, where: str) -> ConfigError | None:
    """The configured transform whose code raised (found by its class among the traceback's `self`s)."""
    items = {path: item for path, item in _typed_items(_args(config, section), f"{section}.args")}
    for frame, _ in reversed(list(traceback.walk_tb(cause.__traceback__))):
        owner = frame.f_locals.get("self")
        if owner is None:
            continue
        matches = [path for path, item in items.items() if _short(item["type"]) == type(owner).__name__]
        if len(matches) == 1:
            path, item = matches[0], items[matches[0]]
            key = blamed_key(cause, item.get("args") or {})
            hint = ""
            if "PIL" in str(cause) or "Tensor" in str(cause):
                hint = " (PIL transforms go before ToTensor, tensor transforms such as Normalize after it)"
            located = f"{path}.args.{key}" if key else path
            problem = f"{item['type']} failed on {where}: {_reason(cause)}{hint}"
            return ConfigError(config.located(located, problem))
    return None


def _typed_items(value: Any, prefix: str) -> list[tuple[str, dict]]:
    """Every {type, ...} mapping inside a list in the args (transform lists), with its key path."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _typed_items(item, f"{prefix}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, dict) and isinstance(item.get("type"), str):
                found.append((f"{prefix}[{index}]", item))
            else:
                found += _typed_items(item, f"{prefix}[{index}]")
    return found


def _holds_pil_image(samples: Any) -> bool:
    if isinstance(samples, (list, tuple)):
        return any(_holds_pil_image(item) for item in samples)
    if isinstance(samples, dict):
        return any(_holds_pil_image(item) for item in samples.values())
    return type(samples).__module__.startswith("PIL.")


def _short(type_name: str) -> str:
    return re.split(r"[.:]", type_name)[-1]


def class_count_mismatch(config: "Config", dataset: Any) -> ConfigError | None:
    """A dataset that names its classes (ImageFolder, CIFAR10, MNIST: `classes`) and a model with fewer
    outputs than that (its `num_classes`-like arg): the error, before anything runs; None when they fit."""
    while dataset is not None and not isinstance(getattr(dataset, "classes", None), (list, tuple)):
        dataset = getattr(dataset, "dataset", None)  # through Subset and the seeding wrapper
    if dataset is None:
        return None
    classes = list(dataset.classes)
    model = next(e for e in entries(config.data, "model") if e.name == eval_model_name(config.data))
    args = model.node.get("args") or {}
    key = next((k for k, v in args.items() if "class" in k.lower() and type(v) is int), None)
    if key is None or args[key] >= len(classes):
        return None
    shown = ", ".join(map(str, classes[:5])) + (", ..." if len(classes) > 5 else "")
    problem = (
        f"the model outputs {args[key]} classes but the training data ({type(dataset).__name__}) has "
        f"{len(classes)} ({shown}): set it to {len(classes)}"
    )
    return ConfigError(config.located(f"{model.path}.args.{key}", problem))


def _largest_label(batch: Any, reported: int) -> int:
    """The largest label of a (data, target) batch of class indices, else the one the loss reported."""
    target = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    is_labels = str(getattr(target, "dtype", "")) in ("torch.int64", "torch.int32") and target.numel() > 0
    return max(int(target.max()), reported) if is_labels else reported


def _labels_beyond_classes(config: "Config", role: str, label: int) -> ConfigError:
    """A classifier whose output has fewer classes than the data's labels: name the model's class count."""
    model = next(e for e in entries(config.data, "model") if e.name == eval_model_name(config.data))
    args = model.node.get("args") or {}
    key = next((k for k, v in args.items() if "class" in k.lower() and isinstance(v, int)), None)
    if key is not None:
        problem = (
            f"the model outputs {args[key]} classes but the {role} data has label {label}: "
            f"set it to the number of classes (at least {label + 1})"
        )
        return ConfigError(config.located(f"{model.path}.args.{key}", problem))
    problem = (
        f"the {role} data has label {label}, beyond the classes the model outputs (its last layer must "
        "output one score per class)"
    )
    return ConfigError(config.located(model.path, problem))


def _suspected_value(config: "Config", cause: BaseException, lookups: dict[str, Lookup]) -> ConfigError | str:
    """For a failure inside a configured model, loss or metric: the ConfigError naming the arg a library
    refused, or `; key = value may be the cause` when the user's code raised, or "" when none is suspected."""
    sections = [(e.path, e.node, lookups.get("arch")) for e in entries(config.data, "model")]
    sections += [(e.path, e.node, lookups.get("loss")) for e in entries(config.data, "loss")]
    sections += [
        (f"metrics[{i}]", spec, lookups.get("metrics")) for i, spec in enumerate(config["metrics"] or [])
    ]
    for frame, _ in reversed(list(traceback.walk_tb(cause.__traceback__))):
        for path, spec, lookup in sections:
            type_name = spec if isinstance(spec, str) else spec.get("type")
            if not isinstance(type_name, str) or not _raised_in(frame, config, path, type_name, lookup):
                continue
            args = {} if isinstance(spec, str) else spec.get("args") or {}
            key = blamed_key(cause, args)
            if key is None:
                return ""
            if raised_in_library(cause) or not raised_in_user_code(cause):
                return ConfigError(
                    config.located(f"{path}.args.{key}", f"{type_name} failed: {_reason(cause)}")
                )
            return f"; {path}.args.{key} = {dict(leaves(args))[key]!r} may be the cause"
    return ""


def _raised_in(frame: Any, config: "Config", path: str, type_name: str, lookup: Lookup) -> bool:
    """Whether `frame` runs the code of the section's type: its function, or a method of its class."""
    try:
        obj = config.resolve(f"{path}.type", type_name, lookup)
    except ConfigError:
        return False
    target = getattr(obj, "func", obj)
    if isinstance(target, type):
        return isinstance(frame.f_locals.get("self"), target)
    return getattr(target, "__code__", None) is frame.f_code
