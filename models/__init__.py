"""Network definitions and a small name -> constructor registry.

>>> from models import get_model
>>> net = get_model("resnet18", in_channels=3, num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .efficientnetv2 import EfficientNetV2, efficientnetv2_m, efficientnetv2_s
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet18, resnet34
from .small_cnn import SmallCNN, small_cnn
from .vgg import VGG, vgg16

ModelFn = Callable[[int, int], nn.Module]

# Canonical names (lower case) -> constructor taking (in_channels, num_classes).
_REGISTRY: dict[str, ModelFn] = {
    "smallcnn": small_cnn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg16": vgg16,
    "mobilenetv2": mobilenetv2,
    "efficientnetv2s": efficientnetv2_s,
    "efficientnetv2m": efficientnetv2_m,
}

# Alternative spellings accepted by get_model; not listed in MODEL_NAMES.
_ALIASES: dict[str, str] = {
    "efficientnetv2_s": "efficientnetv2s",
    "efficientnetv2_m": "efficientnetv2m",
    "vgg16_bn": "vgg16",
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def is_model_name(name: str) -> bool:
    """True when ``name`` (case-insensitive; aliases accepted) names one of the project's models."""
    key = name.strip().lower()
    return _ALIASES.get(key, key) in _REGISTRY


def get_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Build the model registered under ``name`` (case-insensitive; aliases accepted).

    Raises ValueError listing the valid names when ``name`` is unknown.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[key](in_channels, num_classes)


__all__ = [
    "MODEL_NAMES",
    "is_model_name",
    "EfficientNetV2",
    "MobileNetV2",
    "ResNet",
    "SmallCNN",
    "VGG",
    "efficientnetv2_m",
    "efficientnetv2_s",
    "get_model",
    "mobilenetv2",
    "resnet18",
    "resnet34",
    "small_cnn",
    "vgg16",
]
