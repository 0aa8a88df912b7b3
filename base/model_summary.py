"""A model's layer table (name, type, parameters, output shape), like Keras's summary() and Lightning's
ModelSummary, measured on one real batch: forward hooks record each layer's output during the rehearsal's
pass, so the table costs no forward of its own."""

from typing import Any

import torch
from torch import nn


class LayerTable:
    """Hooks on the layers of `model` down to `depth` levels (1: its direct children), recording the first
    output each produces; `table()` after the forward, `remove()` to take the hooks off."""

    def __init__(self, model: nn.Module, depth: int):
        self.model, self.shapes = model, {}
        self.layers = [
            (name, module) for name, module in model.named_modules() if name and name.count(".") < depth
        ]
        self.hooks = [module.register_forward_hook(self._recorder(name)) for name, module in self.layers]

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            self.shapes.setdefault(name, _shape(output))

        return record

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def table(self) -> str:
        rows = [("layer", "type", "params", "output")]
        for name, module in self.layers:
            params = sum(p.numel() for p in module.parameters())
            rows.append(
                (
                    "  " * name.count(".") + name,
                    type(module).__name__,
                    f"{params:,}",
                    self.shapes.get(name, "-"),
                )
            )
        widths = [min(max(len(row[i]) for row in rows), cap) for i, cap in enumerate((32, 20, 12, 40))]
        lines = [
            "  ".join(
                [
                    row[0][: widths[0]].ljust(widths[0]),
                    row[1][: widths[1]].ljust(widths[1]),
                    row[2].rjust(widths[2]),
                    row[3][: widths[3]],
                ]
            )  # fmt: skip
            for row in rows
        ]
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        counts = f"{total:,} parameters ({trainable:,} trainable)"
        title = f"{type(self.model).__name__}: {counts}; output shapes on a real batch"
        return "\n".join([title, *lines])


def _shape(output: Any) -> str:
    """`[128, 10]`, `([128, 10], [128, 4])` for a tuple, `{logits: [128, 10], ...}` for a dict."""
    if isinstance(output, torch.Tensor):
        return str(list(output.shape))
    if isinstance(output, (tuple, list)):
        return (
            "(" + ", ".join(_shape(item) for item in output[:3]) + (", ..." if len(output) > 3 else "") + ")"
        )
    if isinstance(output, dict):
        return "{" + ", ".join(f"{key}: {_shape(value)}" for key, value in list(output.items())[:3]) + "}"
    return type(output).__name__
