"""What `auto` becomes for the settings that make training fast on a GPU, each with the reason the header
prints: bf16 autocast where the GPU has bfloat16, channels_last for convolutional models, fused optimizer
kernels, cudnn.benchmark, checkpoints written in the background. On the CPU the plain settings are the fast
ones (bf16 autocast and channels_last are slower on most CPUs, and a background write takes the training's
cores). An explicit value in the config always wins. `deterministic: true` turns off cudnn.benchmark (its
algorithm choice varies between runs) and says so; the other choices are deterministic.
"""

import inspect
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


def cudnn_benchmark(device: torch.device, deterministic: bool) -> Choice:
    """cudnn.benchmark picks the fastest convolution algorithm per input shape; its choice may differ between
    runs, so it is off under `deterministic: true`."""
    if device.type != "cuda":
        return Choice(False, "set")
    if deterministic:
        return Choice(False, "deterministic: true")
    return Choice(True, "auto: not deterministic")
