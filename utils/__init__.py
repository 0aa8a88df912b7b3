"""Shared helpers; pytorch-template's `from utils import ...` names are re-exported here."""
from .device import prepare_device
from .metrics import MetricTracker
from .util import ensure_dir, inf_loop, read_json, write_json

__all__ = ["MetricTracker", "ensure_dir", "inf_loop", "prepare_device", "read_json", "write_json"]
