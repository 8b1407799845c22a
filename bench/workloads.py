"""The workloads and hardware point shared by the benchmarks (bench/simulator.py, bench/fast_vs_sliced.py).

SmallCNN (the trained checkpoint when ckpts/smallcnn_mnist5k.pt exists) on 1x28x28 inputs; ResNet-18
(CIFAR shapes, random weights) on 3x32x32 inputs, whole or as a subset of its layers (the stem, one 3x3
conv per stage, a 1x1 stride-2 shortcut, the classifier), each fed the activation it sees in the model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing the package

import torch  # noqa: E402
from torch import nn  # noqa: E402

# The original tool's default point: 8-bit weights and inputs, 128 rows, 5-bit dynamic ADC, 1-bit cells,
# state-dependent variation 0.1.
HW_POINT: dict[str, Any] = {"wl_weight": 8, "wl_input": 8, "subArray": 128, "ADCprecision": 5, "cellBit": 1,
                            "vari_type": "state_dependent", "vari": 0.1, "adc_mode": "dynamic"}
RESNET_SUBSET = ["conv1", "layer1.0.conv2", "layer2.0.conv2", "layer2.0.shortcut.0", "layer3.0.conv2",
                 "layer4.0.conv2", "linear"]
SMALLCNN_CKPT = ROOT / "ckpts" / "smallcnn_mnist5k.pt"


class LayerSubset(nn.Module):
    """Some layers of a model, each applied to the input it received inside the model."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(layers)
        self.layers = nn.ModuleDict({name.replace(".", "__"): layer for name, layer in layers.items()})

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers.values(), inputs, strict=True)]


def build_workload(name: str, batch: int, device: torch.device) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, its input, where the weights come from), seeded."""
    from models import get_model

    torch.manual_seed(0)
    if name == "smallcnn":
        model = get_model("smallcnn", in_channels=1, num_classes=10)
        weights = "random"
        if SMALLCNN_CKPT.is_file():
            try:
                payload = torch.load(SMALLCNN_CKPT, map_location="cpu", weights_only=True)
                model.load_state_dict(payload.get("state_dict", payload))
                weights = str(SMALLCNN_CKPT.relative_to(ROOT))
            except (RuntimeError, KeyError, AttributeError, OSError) as exc:
                weights = f"random (checkpoint not loadable: {exc.__class__.__name__})"
        return model.eval().to(device), torch.randn(batch, 1, 28, 28, device=device), weights
    model = get_model("resnet18", 3, 10).eval().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if name == "resnet18":
        return model, x, "random"
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: captured.__setitem__(n, args[0].detach().clone())) for n in RESNET_SUBSET]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    subset = LayerSubset({n: model.get_submodule(n) for n in RESNET_SUBSET}).eval()
    return subset, [captured[n] for n in RESNET_SUBSET], "random"


def first_samples(inputs: Any, n: int) -> Any:
    return [x[:n] for x in inputs] if isinstance(inputs, list) else inputs[:n]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
