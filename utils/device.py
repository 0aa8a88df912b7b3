"""Device choice and the DataLoader settings that depend on it."""

import logging
import os
from typing import Any

import torch

from . import distributed
from .errors import ConfigError

logger = logging.getLogger(__name__)


def gpus_wanted(n_gpu: int | str) -> int:
    """`n_gpu` as a count: `auto` is every visible GPU (none: the CPU, quietly)."""
    return torch.cuda.device_count() if n_gpu == "auto" else int(n_gpu)


def prepare_device(n_gpu: int) -> tuple[torch.device, list[int]]:
    """Use the GPUs asked for when they exist, fewer (down to the CPU) with a warning when not; `n_gpu: 1`
    on a machine without one is the CPU, quietly. Under torchrun each process uses the GPU of its
    LOCAL_RANK."""
    available = torch.cuda.device_count()
    if n_gpu == 1 and available == 0:  # the shipped configs' default on a machine without a GPU: the header
        return torch.device("cpu"), []  # says `device cpu`; a warning on every command would be noise
    if n_gpu > available:
        logger.warning(
            "n_gpu is %d but %d GPU(s) are available here; training on %s",
            n_gpu,
            available,
            f"{available} GPU(s)" if available else "the CPU",
        )
        n_gpu = available
    if n_gpu > 0 and distributed.launched_by_torchrun():
        return torch.device(f"cuda:{distributed.local_rank()}"), [distributed.local_rank()]
    return torch.device("cuda:0" if n_gpu > 0 else "cpu"), list(range(n_gpu))


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or the tensors inside lists, tuples and dicts, on `device` (other values unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def batch_to_device(
    data: Any, target: Any, device: torch.device, channels_last: bool = False
) -> tuple[Any, Any]:
    """A (data, target) batch on `device`; a 4-D image batch in channels_last when the model is."""
    data, target = to_device(data, device), to_device(target, device)
    if channels_last and isinstance(data, torch.Tensor) and data.dim() == 4:
        data = data.contiguous(memory_format=torch.channels_last)
    return data, target


def available_cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_num_workers(num_workers: int | str) -> int:
    """`auto`: 4 workers per visible GPU, capped by the CPUs; on the CPU alone, where the model itself
    needs the cores, 0 to 2."""
    if num_workers != "auto":
        return int(num_workers)
    gpus = torch.cuda.device_count()
    if gpus:
        return min(4 * gpus, available_cpus())
    return min(2, available_cpus() // 4)


def resolve_pin_memory(pin_memory: bool | str) -> bool:
    """`auto`: pinned host memory only pays off for copies to a CUDA device."""
    return torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)


def check_precision(precision: str | int, device: torch.device) -> None:
    """Refuse a mode torch cannot run on this device, naming the one to use instead."""
    precision = str(precision)
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; "
            "use precision: 16-mixed"
        )
    if precision != "32" and not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"trainer.precision: torch has no autocast on {device.type}; use precision: 32")
