"""EfficientNetV2-S/M (Tan & Le, 2021) with a stride-1 stem for 32x32 inputs.

Early stages use Fused-MBConv (a full 3x3 conv replaces expand + depthwise), later stages MBConv with
squeeze-and-excitation. Activations are SiLU. Stochastic depth drops whole residual branches during
training, with the drop probability growing linearly with block index up to ``stochastic_depth``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Stage(NamedTuple):
    """One row of the EfficientNetV2 stage table."""

    fused: bool
    expand: int
    channels: int
    repeats: int
    stride: int
    se_ratio: float


# Stage tables from the paper (Table 4 for S, official configuration for M); kernel size is always 3.
STAGES_S = [
    Stage(True, 1, 24, 2, 1, 0.0),
    Stage(True, 4, 48, 4, 2, 0.0),
    Stage(True, 4, 64, 4, 2, 0.0),
    Stage(False, 4, 128, 6, 2, 0.25),
    Stage(False, 6, 160, 9, 1, 0.25),
    Stage(False, 6, 256, 15, 2, 0.25),
]
STAGES_M = [
    Stage(True, 1, 24, 3, 1, 0.0),
    Stage(True, 4, 48, 5, 2, 0.0),
    Stage(True, 4, 80, 5, 2, 0.0),
    Stage(False, 4, 160, 7, 2, 0.25),
    Stage(False, 6, 176, 14, 1, 0.25),
    Stage(False, 6, 304, 18, 2, 0.25),
    Stage(False, 6, 512, 5, 1, 0.25),
]


def conv_bn_act(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                act: bool = True) -> nn.Sequential:
    """Conv (no bias, BN follows), BN and optionally SiLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool, 1x1 reduce, SiLU, 1x1 expand, sigmoid."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * scale


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        # Rescale so the expected value matches evaluation mode.
        return x * mask / keep


class MBConv(nn.Module):
    """MBConv or Fused-MBConv block with optional SE and a residual when the shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, se_ratio: float,
                 fused: bool, drop_prob: float = 0.0) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if fused:
            if expand == 1:
                # Single 3x3 conv straight to the output width.
                layers.append(conv_bn_act(in_ch, out_ch, 3, stride))
            else:
                layers.append(conv_bn_act(in_ch, hidden, 3, stride))
                if se_ratio > 0:
                    layers.append(SqueezeExcite(hidden, max(1, int(in_ch * se_ratio))))
                layers.append(conv_bn_act(hidden, out_ch, 1, act=False))
        else:
            if expand != 1:
                layers.append(conv_bn_act(in_ch, hidden, 1))
            layers.append(conv_bn_act(hidden, hidden, 3, stride, groups=hidden))
            if se_ratio > 0:
                # SE width is relative to the block input, not the expanded width (as in the paper).
                layers.append(SqueezeExcite(hidden, max(1, int(in_ch * se_ratio))))
            layers.append(conv_bn_act(hidden, out_ch, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.drop = StochasticDepth(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + self.drop(out) if self.use_residual else out


class EfficientNetV2(nn.Module):
    """EfficientNetV2 body built from a stage table, with a 1x1 head conv, pooling and a linear layer."""

    def __init__(self, stages: list[Stage], in_channels: int = 3, num_classes: int = 10,
                 stem_channels: int = 24, head_channels: int = 1280, dropout: float = 0.2,
                 stochastic_depth: float = 0.2) -> None:
        super().__init__()
        # Stem stride 1 instead of 2 so that 32x32 inputs still end at 2x2 rather than 1x1.
        layers: list[nn.Module] = [conv_bn_act(in_channels, stem_channels, 3, stride=1)]
        total = sum(s.repeats for s in stages)
        idx = 0
        in_ch = stem_channels
        for st in stages:
            for i in range(st.repeats):
                drop = stochastic_depth * idx / total
                layers.append(MBConv(in_ch, st.channels, st.stride if i == 0 else 1, st.expand,
                                     st.se_ratio, st.fused, drop))
                in_ch = st.channels
                idx += 1
        layers.append(conv_bn_act(in_ch, head_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(self.dropout(out))


def efficientnetv2_s(in_channels: int = 3, num_classes: int = 10) -> EfficientNetV2:
    """EfficientNetV2-S (about 20.2M parameters for 10 classes)."""
    return EfficientNetV2(STAGES_S, in_channels, num_classes)


def efficientnetv2_m(in_channels: int = 3, num_classes: int = 10) -> EfficientNetV2:
    """EfficientNetV2-M (about 52.9M parameters for 10 classes)."""
    return EfficientNetV2(STAGES_M, in_channels, num_classes, dropout=0.3)
