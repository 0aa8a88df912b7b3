"""Type names -> classes and functions: a short name in a lookup module, a dotted path, or file.py:Name.

Also the trust policy for names read from a checkpoint (README, SECURITY) and the signature check that
reports config args a constructor would reject.
"""

import difflib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Union

from utils.errors import ConfigError

Lookup = Union[ModuleType, tuple[ModuleType, ...], None]  # where short names are found, first match wins

# Types a checkpoint's config may name (see resolve_type and README's SECURITY section).
PROJECT_PACKAGES = ("model", "data_loader", "trainer", "base", "utils", "logger")
DENIED_MODULES = (
    "torch.hub",
    "torch.serialization",
    "torch.jit",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.distributed",
    "torch.multiprocessing",
    "torch.onnx",
    "torch.export",
    "torch.compiler",
    "torch.utils.data.datapipes",
    "torchvision.io",
    "torchvision.datasets.utils",
)
_LOADER_BASES = ("torch.utils.data.DataLoader", "torch.utils.data.Dataset")
UNTRUSTED_CLASS_BASES = {  # what a class named by a checkpoint's config must be, per section
    "arch": ("torch.nn.Module",),
    "data_loader": _LOADER_BASES,
    "valid_data_loader": _LOADER_BASES,
    "test_data_loader": _LOADER_BASES,
    "loss": ("torch.nn.Module",),
    "optimizer": ("torch.optim.Optimizer",),
    "lr_scheduler": ("torch.optim.lr_scheduler.LRScheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"),
    "trainer": ("base.BaseTrainer",),
}
USER_PACKAGES = ("model", "data_loader", "trainer")
UNTRUSTED_FUNCTION_MODULES = ("model", "torchvision.models", "torch.nn.functional", "torchvision.transforms")


NAMED_SECTIONS = {
    "models": "arch",
    "optimizers": "optimizer",
    "lr_schedulers": "lr_scheduler",
    "losses": "loss",
}
TRANSFORM_ARGS = ("transforms", "transform", "target_transform")  # lists of {type, args} from torchvision


def section_kind(key_path: str) -> str:
    """The kind of section a key path lies in, which decides what a checkpoint's config may name there:
    `models.generator.type` -> arch, `metrics[1].type` -> metrics, `data_loader.args.transform[0]` ->
    transform."""
    path = re.sub(r"\[\d+\].*$", "", key_path.removesuffix(".type"))
    if path.endswith(TRANSFORM_ARGS):
        return "transform"
    head = path.split(".")[0]
    return NAMED_SECTIONS.get(head, path)


def closest(name: str, candidates: Any) -> str | None:
    """The candidate within a small edit distance of `name`, if any."""
    match = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    return match[0] if match else None


def close_match(name: str, candidates: Any) -> str:
    """' (did you mean ...?)' for error messages, or nothing."""
    match = closest(name, candidates)
    return f" (did you mean '{match}'?)" if match else ""


def _in_modules(module_name: str, prefixes: Any) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def resolve_type(
    name: str, lookup: Lookup, trusted: bool = True, allowed: tuple[str, ...] = (), section: str = ""
) -> Any:
    """The class or function `name` refers to. An untrusted name (from a checkpoint) may only reach public
    classes and functions of the project, torch, torchvision and `allowed`, never the file route, and
    its root package is checked before anything is imported."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"must be a class or function name, not {name!r}")
    if ".py:" in name:
        if not trusted:
            raise ConfigError(
                f"'{name}' is a Python file named by a checkpoint's config: refused, a downloaded "
                "checkpoint is data, not code. If you trust that file, name it yourself: pass the same "
                f"type on the command line (e.g. arch.type={name}) or in a -c config, or pass "
                "--trust-checkpoint-config (only for checkpoints you made yourself)"
            )
        obj = _from_file(name)
    elif "." not in name and lookup is not None:
        obj, found_in = _from_lookup(name, lookup if isinstance(lookup, tuple) else (lookup,))
    else:
        if not trusted and not _in_modules(name, PROJECT_PACKAGES + ("torch", "torchvision") + allowed):
            raise _refusal(f"'{name}' is outside the project, torch, torchvision and `imports:`")
        denied = [module for module in DENIED_MODULES if _in_modules(name, (module,))]
        if not trusted and denied:  # refused before it is imported
            raise _refusal(
                f"'{name}' is in {denied[0]}, which a checkpoint's config may not name", listable=False
            )
        obj, found_in = _from_dotted_path(name, trusted)
    if not callable(obj):
        raise ConfigError(f"'{name}' is not a class or function")
    if not trusted:
        _check_untrusted(name, obj, found_in, allowed, section)
    return obj


def _from_lookup(name: str, modules: tuple[ModuleType, ...]) -> Any:
    """The object and the module it was found in."""
    found = [(getattr(module, name), module.__name__) for module in modules if hasattr(module, name)]
    if not found or name.startswith("_"):
        public = [n for module in modules for n in dir(module) if not n.startswith("_")]
        where = " or ".join(module.__name__ for module in modules)
        raise ConfigError(f"unknown type '{name}' in {where}{close_match(name, public)}")
    return found[0]


def _from_file(name: str) -> Any:
    path, _, attribute = name.rpartition(":")
    if not Path(path).is_file():
        raise ConfigError(f"no such file '{path}' (from type '{name}')")
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:  # so that the file can import the modules beside it, as when run as a script
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # user code: any failure means "does not import"
        raise ConfigError(f"'{path}' does not import: {type(error).__name__}: {error}") from None
    if not hasattr(module, attribute):
        raise ConfigError(f"'{path}' defines no '{attribute}'{close_match(attribute, dir(module))}")
    return getattr(module, attribute)


def _from_dotted_path(name: str, trusted: bool) -> tuple[Any, str | None]:
    """The object, and the module it is a direct attribute of (None when reached through other objects)."""
    parts = name.split(".")
    if not trusted and any(part.startswith("_") for part in parts):
        raise _refusal(f"'{name}' names a private attribute", listable=False)
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue
            raise ConfigError(f"'{name}' does not import: {error}") from None
        except Exception as error:  # user code: any failure means "does not import"
            raise ConfigError(f"'{name}' does not import: {type(error).__name__}: {error}") from None
        for index, attribute in enumerate(parts[split:]):
            if not hasattr(obj, attribute):
                where = ".".join(parts[: split + index])
                raise ConfigError(f"'{where}' has no '{attribute}'{close_match(attribute, dir(obj))}")
            obj = getattr(obj, attribute)
        return obj, module_name if len(parts) - split == 1 else None
    raise ConfigError(f"'{name}' does not import: no module named '{parts[0]}'")


def _check_untrusted(
    name: str, obj: Any, found_in: str | None, allowed: tuple[str, ...], section: str
) -> None:
    """A class or function must be defined in the project, torch or torchvision (of the kind the section
    expects) or in `allowed`; an object (a loss instance) must be one the project's own modules, or `allowed`
    packages, define directly: code already on this disk, of the user's choosing."""
    is_code = inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)
    if not is_code and found_in and _in_modules(found_in, USER_PACKAGES + allowed):
        return
    module_name = getattr(obj, "__module__", None) or ""
    roots = PROJECT_PACKAGES + ("torch", "torchvision") + allowed
    refused = f"'{name}' (defined in '{module_name or 'builtins'}') may not be named by a checkpoint's config"
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not _in_modules(module_name, roots):
        raise _refusal(refused)
    if _in_modules(module_name, DENIED_MODULES):
        raise _refusal(refused, listable=False)
    if _in_modules(module_name, USER_PACKAGES + allowed):  # code already on this disk, of the user's choosing
        return
    if inspect.isclass(obj) and section == "transform":
        if not _in_modules(module_name, ("torchvision.transforms",)):
            raise _refusal(f"{refused}: transforms must come from torchvision.transforms")
    elif inspect.isclass(obj):
        bases = tuple(_from_dotted_path(base, True)[0] for base in UNTRUSTED_CLASS_BASES.get(section, ()))
        if not bases or not issubclass(obj, bases):
            expected = " or ".join(UNTRUSTED_CLASS_BASES.get(section, ())) or "a function"
            raise _refusal(f"{refused}: {section} must be {expected}")
    elif not _in_modules(module_name, UNTRUSTED_FUNCTION_MODULES):
        raise _refusal(f"{refused}: functions must come from {', '.join(UNTRUSTED_FUNCTION_MODULES)}")


def _refusal(problem: str, listable: bool = True) -> ConfigError:
    """Refused: a downloaded checkpoint is data. The advice names what lifts the refusal: listing the package
    under `imports:` where that suffices (`listable`), else naming the type in the user's own config."""
    remedy = (
        "list its package under `imports:` in your own -c config"
        if listable
        else "name the type yourself in your own -c config (or as key.type=... on the command line)"
    )
    return ConfigError(
        f"{problem}: refused, a downloaded checkpoint is data, not code. To allow it, {remedy}, or pass "
        "--trust-checkpoint-config (only for checkpoints you made yourself)"
    )


def check_arguments(obj: Any, args: dict, runtime_args: int = 0) -> list[tuple[str, str]]:
    """(key, problem) for each config arg the signature rejects and each required parameter missing."""
    try:
        parameters = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check against
        return []
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    at_runtime = [p.name for p in named[:runtime_args]]
    configurable = [p.name for p in named[runtime_args:]]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    problems = []
    for key in args:
        if key in at_runtime:
            problems.append((key, "is passed by the framework at run time; remove it from the config"))
        elif key not in configurable and not takes_any:
            problems.append((key, f"is not an argument of {_qualname(obj)}{close_match(key, configurable)}"))
    for p in named[runtime_args:]:
        if p.default is p.empty and p.name not in args:
            problems.append((p.name, f"is a required argument of {_qualname(obj)}; add it"))
    return problems


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", repr(obj))
