"""SmallCNN: the project's default model, small enough to train on MNIST on a laptop CPU in seconds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Three conv/BN/ReLU blocks followed by a two-layer classifier.

    Layer names (conv1..conv3, bn1..bn3, fc1, fc2) are relied upon elsewhere in the project, so keep them.
    The adaptive pool to 2x2 makes the classifier input 256 features for any input size >= 1x1
    (28x28 MNIST as well as 8x8 scikit-learn digits).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        # Convs carry no bias: the following BatchNorm has its own shift.
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


def small_cnn(in_channels: int = 1, num_classes: int = 10) -> SmallCNN:
    """Build the default SmallCNN."""
    return SmallCNN(in_channels, num_classes)
