"""Example model: pytorch-template's LeNet for MNIST."""

import torch
import torch.nn.functional as F
from torch import nn

from base import BaseModel


class MnistModel(BaseModel):
    """Two conv layers and two linear layers with dropout; outputs log-probabilities (use nll_loss).
    `dropout` is the rate of both dropout layers (the template's 0.5 underfits a few thousand digits)."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.dropout = dropout
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.dropout(F.relu(self.fc1(x)), self.dropout, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)
