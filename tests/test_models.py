"""Shape, registry and parameter-count checks for the models package."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import MODEL_NAMES, SmallCNN, get_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_shape(model: nn.Module, shape: tuple[int, ...]) -> torch.Size:
    model.eval()
    return model(torch.randn(*shape)).shape


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_mnist_shape(name: str) -> None:
    model = get_model(name, in_channels=1, num_classes=10)
    assert forward_shape(model, (2, 1, 28, 28)) == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_cifar_shape(name: str) -> None:
    model = get_model(name, in_channels=3, num_classes=100)
    assert forward_shape(model, (2, 3, 32, 32)) == (2, 100)


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "vgg16", "mobilenetv2"])
def test_forward_tiny_input(name: str) -> None:
    # 8x8 scikit-learn digits must not collapse the feature map to zero size.
    model = get_model(name, in_channels=1, num_classes=10)
    assert forward_shape(model, (2, 1, 8, 8)) == (2, 10)


def test_names_are_case_insensitive_and_aliases_work() -> None:
    assert isinstance(get_model("SmallCNN", 1, 10), SmallCNN)
    assert type(get_model("VGG16_BN")) is type(get_model("vgg16"))
    assert n_params(get_model("efficientnetv2_s")) == n_params(get_model("EfficientNetV2S"))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'foo'; valid names: smallcnn, resnet18") as exc:
        get_model("foo")
    for name in MODEL_NAMES:
        assert name in str(exc.value)


def test_small_cnn_layers() -> None:
    model = SmallCNN(in_channels=1, num_classes=10)
    expected = {
        "conv1": (nn.Conv2d, (16, 1, 3, 3)),
        "conv2": (nn.Conv2d, (32, 16, 3, 3)),
        "conv3": (nn.Conv2d, (64, 32, 3, 3)),
        "fc1": (nn.Linear, (128, 256)),
        "fc2": (nn.Linear, (10, 128)),
    }
    for name, (cls, shape) in expected.items():
        layer = getattr(model, name)
        assert isinstance(layer, cls)
        assert tuple(layer.weight.shape) == shape
    for name in ("conv1", "conv2", "conv3"):
        assert getattr(model, name).bias is None
        assert getattr(model, name).padding == (1, 1)
    for name, width in (("bn1", 16), ("bn2", 32), ("bn3", 64)):
        bn = getattr(model, name)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == width
    assert forward_shape(model, (2, 1, 28, 28)) == (2, 10)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("vgg16", 14_724_042),
        ("mobilenetv2", 2_236_682),
    ],
)
def test_param_counts(name: str, expected: int) -> None:
    count = n_params(get_model(name, in_channels=3, num_classes=10))
    assert abs(count - expected) <= 0.02 * expected


def test_vgg16_cifar_classifier() -> None:
    model = get_model("vgg16", in_channels=3, num_classes=10)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == 512


@pytest.mark.parametrize(
    ("name", "expected"),
    # ImageNet-head counts published for EfficientNetV2-S/M (1000 classes).
    [("efficientnetv2s", 21_458_488), ("efficientnetv2m", 54_139_356)],
)
def test_efficientnetv2_param_counts(name: str, expected: int) -> None:
    count = n_params(get_model(name, in_channels=3, num_classes=1000))
    assert abs(count - expected) <= 0.02 * expected
