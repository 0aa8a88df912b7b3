"""Metrics named by `metrics:` in the config. They return tensors: reading them back is the tracker's job."""

import torch


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose top prediction is the target."""
    return (output.argmax(dim=1) == target).float().mean()


def top_k_acc(output: torch.Tensor, target: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Fraction of samples whose target is among the k highest scores."""
    top_k = output.topk(k, dim=1).indices
    return (top_k == target.unsqueeze(1)).any(dim=1).float().mean()
