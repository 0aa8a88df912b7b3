"""Loss functions named by `loss:` in the config."""

import torch
import torch.nn.functional as F


def nll_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For models that output log-probabilities (MnistModel)."""
    return F.nll_loss(output, target)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For models that output raw logits."""
    return F.cross_entropy(output, target)
