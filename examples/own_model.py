"""Your own model through nipa's Python API: a small CNN trained for 20 epochs (a few seconds) on the offline digits
data (sklearn's load_digits, 8 x 8 images), then the four calls, each on a few hardware points.

    python examples/own_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import nipa  # noqa: E402
from nipa.workloads.datasets import get_dataset  # noqa: E402


class DigitsNet(nn.Module):
    """Two convolutions and a linear classifier for 1 x 8 x 8 digits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = get_dataset("digits", split, augment=False)
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(data.targets)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 20) -> None:
    # A fixed number of epochs (not a time budget), so the same seed gives the same model on any machine.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    model.eval()


def main() -> dict:
    torch.manual_seed(0)
    x_train, y_train = tensors("train")
    x_test, y_test = tensors("test")
    model = DigitsNet()
    train(model, x_train, y_train)

    points = [{"wl_weight": 6, "wl_input": 6, "subArray": 64, "ADCprecision": 6, "vari": v} for v in (0.0, 0.3)]
    simulated = nipa.simulate(model, (x_test, y_test), points, chips=2)
    stats = nipa.statistics(model, points)
    scores = nipa.score(stats, points)
    estimated = nipa.estimate(model, (x_test, y_test), points, draws=2, calibration=x_train[:256])

    print(f"float model: top-1 {simulated[0].ideal:.2f}%")
    print(f"{'point':64s} {'simulated':>9s} {'estimated':>9s} {'log2 NIPA':>9s}")
    for sim, est, value in zip(simulated, estimated, scores, strict=True):
        print(f"{sim.point.describe():64s} {sim.mean:9.2f} {est.mean:9.2f} {torch.tensor(value).log2():9.2f}")
    return {"simulated": [s.mean for s in simulated], "estimated": [e.mean for e in estimated], "nipa": scores,
            "ideal": simulated[0].ideal}


if __name__ == "__main__":
    main()
