"""A user's own data: tensor files (train/test keys, a name_train/name_test pair, one set with --split) and an
image folder of .npy images, through main.py; calibration data come from the train split; errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from nipa.workloads.userdata import ImageOptions, image_folder_split, tensor_file_split, user_dataset_id
from nipa.workloads.workload import Workload

SPACE = """
[Algorithm_Level]
wl_weight = 6
wl_input = 6
[Hardware_Level]
subArray = 64
ADCprecision = 6
ADCmode = calibrated
[Device_Level]
cellBit = 1
vari = 0.0
"""


class Flat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture()
def setup(tmp_path) -> dict[str, Path]:
    (tmp_path / "flat.py").write_text(
        "import torch\nclass Flat(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(16, 3)\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    torch.manual_seed(0)
    torch.save(Flat().state_dict(), tmp_path / "flat.pth")
    (tmp_path / "space.ini").write_text(SPACE)
    return {"dir": tmp_path, "model": tmp_path / "flat.py", "ckpt": tmp_path / "flat.pth",
            "space": tmp_path / "space.ini"}


def run(setup, dataset: str, *extra: str) -> int:
    return main.main(["--model_name", f"{setup['model']}:Flat", "--ckpt", str(setup["ckpt"]), "--dataset", dataset,
                      "--HWdes", str(setup["space"]), "--cycle", "1", "--calib_batches", "1",
                      "--out", str(setup["dir"] / "out.jsonl"), "--device", "cpu", *extra])


def test_tensor_file_with_splits_runs_and_records_its_sha256(setup):
    data = setup["dir"] / "blobs.pt"
    torch.save({"x_train": torch.randn(20, 16), "y_train": torch.arange(20) % 3,
                "x_test": torch.randn(10, 16), "y_test": torch.arange(10) % 3}, data)
    assert run(setup, str(data)) == 0
    record = json.loads((setup["dir"] / "out.jsonl").read_text().splitlines()[-1])
    assert record["dataset"] == "blobs" and record["samples"] == 10
    assert len(record["workload"]["dataset_sha256"]) == 64


def test_split_is_seeded_and_disjoint(setup):
    data = setup["dir"] / "one.npz"
    np.savez(data, x=np.arange(50 * 16, dtype=np.float32).reshape(50, 16), y=np.arange(50) % 3)
    train, test = (tensor_file_split(str(data), split, 0.8, seed=1) for split in ("train", "test"))
    assert len(train) == 40 and len(test) == 10
    rows = {tuple(r.tolist()) for r in train.inputs} & {tuple(r.tolist()) for r in test.inputs}
    assert not rows
    again = tensor_file_split(str(data), "test", 0.8, seed=1)
    assert torch.equal(again.inputs, test.inputs)
    assert not torch.equal(tensor_file_split(str(data), "test", 0.8, seed=2).inputs, test.inputs)


def test_calibration_comes_from_the_train_split(setup):
    stem = setup["dir"] / "pair"
    torch.save({"x": torch.full((6, 16), 1.0), "y": torch.zeros(6, dtype=torch.long)}, f"{stem}_train.pt")
    torch.save({"x": torch.full((4, 16), -1.0), "y": torch.zeros(4, dtype=torch.long)}, f"{stem}_test.pt")
    assert user_dataset_id(f"{stem}_test.pt") == "pair"
    workload = Workload.user_model(f"{setup['model']}:Flat", f"{stem}_test.pt", ckpt=str(setup["ckpt"]))
    model, _, data = workload.load()
    calibration = workload.calibration_inputs(data, 1, batch_size=8)
    assert torch.all(calibration[0] == 1.0)  # train inputs, never the test split's -1
    assert run(setup, f"{stem}_train.pt") == 0


def test_npy_image_folder(setup):
    root = setup["dir"] / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                np.save(root / split / cls / f"{i}.npy", rng.integers(0, 255, (6, 6), dtype=np.uint8))
    test = image_folder_split(str(root), "test", ImageOptions((4, 4), (0.5,), (0.25,)))
    assert len(test) == 6 and test[0][0].shape == (1, 4, 4) and test.targets == [0, 0, 1, 1, 2, 2]
    assert run(setup, str(root), "--input_size", "4", "--mean", "0.5", "--std", "0.25") == 0


def test_data_errors(setup, capsys):
    one = setup["dir"] / "one.pt"
    torch.save({"x": torch.randn(10, 16), "y": torch.zeros(10, dtype=torch.long)}, one)
    assert run(setup, str(one)) == 2
    assert "--split 0.8" in capsys.readouterr().err
    assert run(setup, str(setup["dir"] / "absent.pt")) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save({"inputs": torch.randn(3, 16)}, one)
    assert run(setup, str(one), "--split", "0.5") == 2
    assert "no key(s)" in capsys.readouterr().err
    (setup["dir"] / "tree" / "train" / "a").mkdir(parents=True)
    assert run(setup, str(setup["dir"] / "tree")) == 2
    assert "test/<class>" in capsys.readouterr().err
    assert run(setup, str(one), "--split", "1.5") == 2
    assert "--split 1.5" in capsys.readouterr().err
