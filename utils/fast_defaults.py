"""What `auto` becomes for the settings that make training fast on a GPU, each with the reason the header
prints: bf16 autocast where the GPU has bfloat16, channels_last for convolutional models, fused optimizer
kernels, cudnn.benchmark, checkpoints written in the background, and on any device host memory kept for reuse
(glibc's malloc tuned). On the CPU the plain settings are the fast ones for the rest (bf16 autocast and
channels_last are slower on most CPUs, and a background write takes the training's cores). An explicit value
in the config always wins. `deterministic: true` turns off cudnn.benchmark (its
algorithm choice varies between runs) and says so; the other choices are deterministic.
"""

import ctypes
import inspect
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str

    def shown(self, name: str) -> str:
        """`channels_last on`, `precision bf16-mixed`: the setting as the header shows it."""
        value = ("on" if self.value else "off") if isinstance(self.value, bool) else self.value
        return f"{name} {value}"


def described(choices: dict[str, Choice]) -> str:
    """`precision 32, channels_last off (auto: fastest on the CPU)`: the settings `auto` chose, those with one
    reason together; those the config set are left out."""
    by_reason: dict[str, list[str]] = {}
    for name, choice in choices.items():
        if choice.reason != "set":
            by_reason.setdefault(choice.reason, []).append(choice.shown(name))
    return "; ".join(f"{', '.join(shown)} ({reason})" for reason, shown in by_reason.items())


def choose_precision(setting: str, device: torch.device, bf16_supported: bool | None = None) -> Choice:
    """`auto`: bf16-mixed on a GPU with bfloat16 (no GradScaler needed, fp32's range), else 32."""
    if str(setting) != "auto":
        return Choice(str(setting), "set")
    if device.type != "cuda":
        return Choice("32", f"auto: fastest on the {device.type.upper()}")
    supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    if supported:
        return Choice("bf16-mixed", "auto: the GPU has bfloat16")
    return Choice("32", "auto: the GPU has no bfloat16")


def choose_channels_last(setting: bool | str, device: torch.device, models: list[nn.Module]) -> Choice:
    """`auto`: channels_last for a model with 2-D convolutions on CUDA (tensor cores read NHWC)."""
    if setting != "auto":
        return Choice(bool(setting), "set")
    convolutional = any(isinstance(m, nn.Conv2d) for model in models for m in model.modules())
    if not convolutional:
        return Choice(False, "auto: no 2-D convolutions")
    if device.type != "cuda":
        return Choice(False, f"auto: fastest on the {device.type.upper()}")
    return Choice(True, "auto: convolutions on CUDA")


def optimizer_kernels(optimizer_class: Any, args: dict, device: torch.device) -> Choice:
    """The extra constructor arguments for the fast kernels: `fused=True` on CUDA for an optimizer that
    offers it (Adam, AdamW, SGD, ...), unless the config chose `fused` or `foreach` itself; torch already uses
    foreach kernels by default elsewhere on CUDA."""
    if "fused" in args or "foreach" in args:
        return Choice({}, "set")
    try:
        takes_fused = "fused" in inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        takes_fused = False
    if device.type == "cuda" and takes_fused:
        return Choice({"fused": True}, "auto: CUDA")
    return Choice({}, "")


def choose_background_saves(setting: bool | str, device: torch.device) -> Choice:
    """`auto`: checkpoints written on a thread while a GPU trains, when the host's cores are idle; on the CPU
    the write takes cores the training's kernels use, and costs more beside them than before them."""
    if setting != "auto":
        return Choice(bool(setting), "set")
    if device.type == "cpu":
        return Choice(False, "auto: fastest on the CPU")
    return Choice(True, f"auto: the host is free while the {device.type.upper()} trains")


MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEPT_BELOW = 32 << 20  # allocations up to this size come from the heap: glibc's largest mmap threshold
KEPT_FREE = 1 << 30  # freed heap memory kept for reuse, up to this much, rather than returned to the kernel


def choose_host_memory(setting: bool | str) -> Choice:
    """`auto`: on where glibc's malloc serves the process untuned. It gives each allocation above a threshold
    (128 KiB, rising with use) fresh pages from the kernel and returns them when freed, so every batch's
    activations and gradients fault their pages in again: 15% of an MNIST epoch on 2 CPU cores. Kept, the
    memory is reused, which is what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc."""
    if setting != "auto":
        return Choice(bool(setting), "set")
    if platform.libc_ver()[0] != "glibc":
        return Choice(False, "auto: not glibc's malloc")
    if "malloc" in os.environ.get("LD_PRELOAD", "") or any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return Choice(False, "auto: the environment chose the allocator's settings")
    return Choice(True, "auto: glibc's malloc")


def keep_host_memory() -> bool:
    """Tune glibc's malloc for the whole process (mallopt): heap memory up to KEPT_BELOW a block, freed memory
    kept up to KEPT_FREE. False where the malloc is not glibc's, or glibc refused a setting."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_BELOW)) & bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE))


def cudnn_benchmark(device: torch.device, deterministic: bool) -> Choice:
    """cudnn.benchmark picks the fastest convolution algorithm per input shape; its choice may differ between
    runs, so it is off under `deterministic: true`."""
    if device.type != "cuda":
        return Choice(False, "set")
    if deterministic:
        return Choice(False, "deterministic: true")
    return Choice(True, "auto: not deterministic")
