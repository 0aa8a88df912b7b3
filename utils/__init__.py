"""Shared helpers. pytorch-template's `from utils import ...` names resolve here on first use, so that
importing a light module such as utils.errors does not load torch."""

import importlib
from typing import Any

_TEMPLATE_NAMES = {
    "MetricTracker": "metrics",
    "prepare_device": "device",
    "ensure_dir": "util",
    "inf_loop": "util",
    "read_json": "util",
    "write_json": "util",
}
__all__ = sorted(_TEMPLATE_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _TEMPLATE_NAMES:
        raise AttributeError(f"module 'utils' has no attribute '{name}'")
    return getattr(importlib.import_module(f"utils.{_TEMPLATE_NAMES[name]}"), name)
