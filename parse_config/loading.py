"""Reading config files and command-line overrides into plain data: bounded, safe YAML or JSON.

Imports no torch, so that `train.py --help` answers at once.
"""

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from utils.errors import ConfigError


class FloatSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads `1e-3` as a float: YAML 1.1 would make it the string '1e-3'."""


FloatSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


MAX_CONFIG_BYTES = 1_000_000  # a config is a page of text; anything larger is not one
MAX_CONFIG_NODES = 100_000  # after YAML aliases are expanded: refuses "billion laughs"
MAX_CONFIG_DEPTH = 64


def load_config_file(path: str | Path) -> dict:
    """A config mapping from .yaml/.yml (safe loader) or .json, of bounded size, depth and alias expansion."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: a config file must end in .yaml, .yml or .json")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size:,} bytes is too large for a config (at most {MAX_CONFIG_BYTES:,})"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    try:
        data = (
            json.loads(text)
            if path.suffix == ".json" and text.strip()
            else yaml.load(text, Loader=FloatSafeLoader)
        )
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        hint = "; Python tags are never executed" if "python/" in str(error) else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}{hint}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    problem = _oversized(data)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _oversized(data: Any) -> str | None:
    """Walk the loaded data as it will be used, with YAML aliases expanded: too many nodes (an alias bomb),
    too deep, or a mapping that contains itself are not configs."""
    count, stack = 0, [(data, 0, ())]
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            return f"expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases?); not a config"
        if depth > MAX_CONFIG_DEPTH:
            return f"nested more than {MAX_CONFIG_DEPTH} levels deep; not a config"
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)) and id(child) in path:
                return "contains itself (a recursive YAML alias); not a config"
            stack.append((child, depth + 1, path + (id(node),)))
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML); splits on the first '=' only."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override '{text}': no '='; write key.path=value, e.g. trainer.epochs=5")
    if not key:
        raise ConfigError(f"override '{text}': no key before '='; write key.path=value")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': empty part in key path '{key}'; write key.path=value")
    try:
        value = yaml.load(raw, Loader=FloatSafeLoader) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", error)
        raise ConfigError(f"override '{text}': the value is not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"override '{text[:40]}...': the value is nested too deeply") from None
    problem = _oversized(value)
    if problem:
        raise ConfigError(f"override '{text[:40]}': the value {problem}")
    return parts, value


def set_key(data: dict, parts: list[str], value: Any, text: str) -> None:
    """Set a nested key, creating mappings on the way; unknown keys are caught by validation."""
    node = data
    for index, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or `lr_scheduler: null` in the file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{text}': {'.'.join(parts[: index + 1])} is not a mapping")
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursively for mappings; lists and values are replaced whole."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def leaf_paths(data: Any, prefix: str = "") -> set[str]:
    """Every key path in a nested mapping, inner nodes included."""
    if not isinstance(data, dict):
        return {prefix}
    paths = {prefix} if prefix else set()
    for key, value in data.items():
        paths |= leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return paths
