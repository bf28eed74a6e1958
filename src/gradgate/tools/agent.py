"""The example agent: a convolutional front-end and an MLP back-end.

``Agent`` chains a ``FeatureExtractor`` (``front_end``) and a
``PolicyNetwork`` (``back_end``). They reproduce ``shared/seed`` Example 1
exactly (3x28x28 input, 32*7*7 features, two linear layers) so demos, tests
and benchmarks share one scenario. (This module was ``gradgate.tools.seed``;
that name still imports.)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Agent", "FeatureExtractor", "PolicyNetwork"]


class FeatureExtractor(nn.Module):
    """The seed's front-end: two conv/ReLU/max-pool stages, flattened.

    Example:
        >>> import torch
        >>> FeatureExtractor()(torch.zeros(2, 3, 28, 28)).shape
        torch.Size([2, 1568])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return x.reshape(x.size(0), -1)


class PolicyNetwork(nn.Module):
    """The seed's back-end: Linear, ReLU, Linear.

    Example:
        >>> import torch
        >>> PolicyNetwork(8, 4, 2)(torch.zeros(1, 8)).shape
        torch.Size([1, 2])
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.relu(self.fc1(x)))
        return out


class Agent(nn.Module):
    """Front-end followed by back-end, as in the seed.

    Example:
        >>> import torch
        >>> Agent()(torch.zeros(1, 3, 28, 28)).shape
        torch.Size([1, 10])
    """

    def __init__(self, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.front_end = FeatureExtractor()
        self.back_end = PolicyNetwork(32 * 7 * 7, hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.back_end(self.front_end(x))
        return out
