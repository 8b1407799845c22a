"""CIFAR-style VGG-16 with batch normalisation (Simonyan & Zisserman, 2015)."""

from __future__ import annotations

import torch
from torch import nn

# Numbers are conv output channels, "M" a 2x2 max-pool.
CFG_VGG16: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


class VGG(nn.Module):
    """VGG feature stack (3x3 conv, BN, ReLU) and a single linear classifier on 512 features.

    Max-pools use ceil_mode so that a map already at 1x1 stays at 1x1 instead of collapsing:
    32x32 inputs reach exactly 1x1 as in the standard CIFAR model, 28x28 and 8x8 inputs work too.
    """

    def __init__(self, cfg: list[int | str], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = self._make_layers(cfg, in_channels)
        # Identity at 32x32 (already 1x1); averages whatever is left for other input sizes.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layers(cfg: list[int | str], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                assert isinstance(v, int)
                # No conv bias: the BatchNorm shift that follows makes it redundant.
                layers += [
                    nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                in_channels = v
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(out)


def vgg16(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG-16 with batch norm (about 14.7M parameters for 10 classes)."""
    return VGG(CFG_VGG16, in_channels, num_classes)
