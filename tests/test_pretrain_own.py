"""pretrain.py with a user's model class and a user's tensor file: the checkpoint it writes is the one
main.py then loads with --ckpt (the float model's accuracy in the records is the trained one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main
import pretrain
from nipa.workloads.usermodel import user_model_id

MODEL_FILE = '''
import torch
from torch import nn

class Quadrants(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, num_classes)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))
'''

SPACE = """
[Algorithm_Level]
wl_weight = 8
wl_input = 8
[Hardware_Level]
subArray = 64
ADCprecision = 8
[Device_Level]
cellBit = 1
vari = 0.0
"""


def quadrant_data(path: Path, n: int = 160) -> Path:
    """8x8 images whose label is the bright quadrant: learnable in a few epochs, chance is 25%."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=generator)
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=generator)
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[i, 0, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 1.0
    torch.save({"x": x, "y": y}, path)
    return path


def test_pretrain_a_model_class_on_a_tensor_file_then_main_loads_it(tmp_path, capsys):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    data = quadrant_data(tmp_path / "quadrants.pt")
    (tmp_path / "space.ini").write_text(SPACE)
    ckpt = tmp_path / "weights" / "quadrants_net.pt"
    model = ["--model_name", f"{tmp_path / 'net.py'}:Quadrants", "--dataset", str(data), "--split", "0.75"]
    train = [*model, "--epochs", "4", "--batch_size", "16", "--lr", "0.05", "--step_size", "4", "--device", "cpu",
             "--ckpt", str(ckpt)]
    assert pretrain.main(train) == 0
    payload = torch.load(ckpt, weights_only=True)
    assert payload["model"] == user_model_id(model[1])  # the workload's ids, as records name them
    assert payload["dataset"] == "quadrants" and payload["input_shape"] == [1, 8, 8]
    assert payload["test_top1"] > 60.0  # trained, well above the 25% of chance
    assert pretrain.main(train) == 0 and "skipping training" in capsys.readouterr().out  # not trained twice

    out = tmp_path / "accsim.jsonl"
    assert main.main([*model, "--ckpt", str(ckpt), "--HWdes", str(tmp_path / "space.ini"), "--cycle", "1",
                      "--out", str(out), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ideal = next(r for r in records if r["method"] == "ideal")
    # the same test split (the --split permutation of seed 0) and the same weights: the same accuracy
    assert ideal["top1"] == pytest.approx(payload["test_top1"], abs=1e-9)
    assert ideal["workload"]["checkpoint_sha256"] is not None


def test_pretrain_refuses_a_saved_model_and_an_unknown_dataset(tmp_path, capsys):
    data = quadrant_data(tmp_path / "q.pt")
    torch.jit.script(torch.nn.Linear(64, 4)).save(str(tmp_path / "m.pt"))
    assert pretrain.main(["--model_name", str(tmp_path / "m.pt"), "--dataset", str(data), "--split", "0.5",
                          "--device", "cpu"]) == 2
    assert "trains a model class" in capsys.readouterr().err
    assert pretrain.main(["--dataset", "no_such_set", "--device", "cpu"]) == 2
    assert "no_such_set" in capsys.readouterr().err
