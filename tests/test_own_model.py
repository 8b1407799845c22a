"""A user's own model file (state dict, checkpoint dict, torch.export, scripted Sequential) through main.py,
stat.py, validate.py and wrap_error.py on a tiny grid, and every user error of a model file (exit 2)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import main
import validate
import wrap_error

ROOT = Path(__file__).resolve().parents[1]

MODEL_FILE = '''
import torch
from torch import nn

class TinyNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))

class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.scale
'''

SPACE = """
[Algorithm_Level]
wl_weight = 6
wl_input = 6
[Hardware_Level]
subArray = 64
ADCprecision = 6
[Device_Level]
cellBit = 1
vari = 0.2
"""


def stat_script():
    spec = importlib.util.spec_from_file_location("nipa_stat_script_own", ROOT / "stat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("own_model")
    (folder / "net.py").write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location("own_net_for_test", folder / "net.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.save(model) pickles the class by its module's name
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.TinyNet().eval()
    torch.save(model.state_dict(), folder / "weights.pth")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, folder / "checkpoint.pth")
    torch.save(module.TinyNet(width=4).state_dict(), folder / "other.pth")
    example = torch.randn(4, 1, 8, 8)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, folder / "net.pt2")
    sequential = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                     torch.nn.Linear(16, 10)).eval()
    torch.jit.script(sequential).save(folder / "seq.pt")
    torch.jit.script(model).save(folder / "scripted.pt")
    torch.save(model, folder / "pickled.pth")
    (folder / "space.ini").write_text(SPACE)
    return {name: folder / name for name in ("net.py", "weights.pth", "checkpoint.pth", "other.pth", "net.pt2",
                                             "seq.pt", "scripted.pt", "pickled.pth", "space.ini")} | {"dir": folder}


def run_main(files, model_args: list[str], out: Path) -> int:
    return main.main([*model_args, "--dataset", "digits", "--HWdes", str(files["space.ini"]), "--cycle", "1",
                      "--limit", "32", "--batch_size", "32", "--out", str(out), "--device", "cpu"])


@pytest.mark.parametrize("kind", ["state_dict", "checkpoint", "export", "torchscript"])
def test_main_records_a_user_model(files, kind, capsys):
    model_args = {"state_dict": ["--model_name", f"{files['net.py']}:TinyNet", "--ckpt", str(files["weights.pth"])],
                  "checkpoint": ["--model_name", f"{files['net.py']}:TinyNet", "--ckpt",
                                 str(files["checkpoint.pth"])],
                  "export": ["--model_name", str(files["net.pt2"])],
                  "torchscript": ["--model_name", str(files["seq.pt"])]}[kind]
    out = files["dir"] / f"{kind}_accsim.jsonl"
    assert run_main(files, model_args, out) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    sliced = [r for r in records if r["method"] == "sliced"]
    assert len(sliced) == 1 and sliced[0]["workload"]["kind"] == "user"
    log = capsys.readouterr().out
    if kind != "torchscript":
        assert sliced[0]["mapped_layers"] == ["conv", "fc"]
        assert "dw" in log and "groups=8" in log  # the depthwise convolution stays digital, and says why
    if kind == "checkpoint":
        assert sliced[0]["model"] == "net_tinynet" and sliced[0]["workload"]["class"] == "TinyNet"


def test_user_model_through_stat_validate_and_wrap_error(files):
    model = ["--model_name", f"{files['net.py']}:TinyNet", "--ckpt", str(files["weights.pth"])]
    records, stats = files["dir"] / "chain_accsim.jsonl", files["dir"] / "chain_stats.json"
    assert run_main(files, model, records) == 0
    assert stat_script().main([*model, "--dataset", "digits", "--HWdes", str(files["space.ini"]),
                               "--out", str(stats)]) == 0
    meta = json.loads(stats.read_text())["meta"]
    assert meta["workload"]["checkpoint_sha256"] == json.loads(records.read_text().splitlines()[-1])["run"]["weights"]
    summary = validate.main([*model[:2], "--dataset", "digits", "--records", str(records), "--stats", str(stats),
                             "--out_dir", str(files["dir"] / "val"), "--bootstrap", "0", "--no_plot"])
    assert summary == 0
    wrap_out = files["dir"] / "chain_wrap.jsonl"
    assert wrap_error.main([*model, "--dataset", "digits", "--ground_truth", str(records), "--out", str(wrap_out),
                            "--cycle", "1", "--time_points", "0", "--device", "cpu"]) == 0
    fast = [json.loads(line) for line in wrap_out.read_text().splitlines()]
    assert fast and all(r["workload"]["class"] == "TinyNet" for r in fast)
    # The export of the same model is another model: its records never join this file.
    assert run_main(files, ["--model_name", str(files["net.pt2"])], records) == 2


def error_of(capsys, code: int) -> str:
    assert code == 2
    return capsys.readouterr().err


def test_model_file_errors(files, capsys, tmp_path):
    net = files["net.py"]
    out = tmp_path / "r.jsonl"
    err = error_of(capsys, run_main(files, ["--model_name", f"{tmp_path}/missing.py:TinyNet", "--ckpt",
                                            str(files["weights.pth"])], out))
    assert "main.py: error:" in err and "no such file" in err
    err = error_of(capsys, run_main(files, ["--model_name", f"{net}:Missing", "--ckpt", str(files["weights.pth"])],
                                    out))
    assert "defines no 'Missing'" in err and "TinyNet" in err
    err = error_of(capsys, run_main(files, ["--model_name", f"{net}:TinyNet", "--ckpt", str(files["other.pth"])],
                                    out))
    assert "does not fit" in err and "shape mismatches" in err and "conv.weight" in err
    err = error_of(capsys, run_main(files, ["--model_name", f"{net}:TinyNet", "--model_kwargs", '{"width": 4}',
                                            "--ckpt", str(files["weights.pth"])], out))
    assert "shape mismatches" in err
    err = error_of(capsys, run_main(files, ["--model_name", f"{net}:TinyNet", "--ckpt", str(files["net.py"])],
                                    out))
    assert "cannot be read as weights" in err
    err = error_of(capsys, run_main(files, ["--model_name", f"{net}:NoLayers", "--ckpt", str(files["weights.pth"])],
                                    out))
    assert "unexpected keys" in err and "missing keys: scale" in err
    err = error_of(capsys, run_main(files, ["--model_name", str(files["scripted.pt"])], out))
    assert "TorchScript" in err and "torch.export" in err and "conv, dw, fc" in err
    err = error_of(capsys, run_main(files, ["--model_name", str(files["pickled.pth"])], out))
    assert "--allow_pickle" in err
    assert not out.exists()


def test_no_mappable_layer_and_input_shape_errors(files, capsys, tmp_path):
    torch.save({"scale": torch.ones(1)}, tmp_path / "scale.pth")
    err = error_of(capsys, run_main(files, ["--model_name", f"{files['net.py']}:NoLayers", "--ckpt",
                                            str(tmp_path / "scale.pth")], tmp_path / "a.jsonl"))
    assert "no mappable layer" in err
    data = tmp_path / "wide.pt"
    torch.save({"x_train": torch.randn(8, 3, 8, 8), "y_train": torch.zeros(8, dtype=torch.long),
                "x_test": torch.randn(8, 3, 8, 8), "y_test": torch.zeros(8, dtype=torch.long)}, data)
    code = main.main(["--model_name", f"{files['net.py']}:TinyNet", "--ckpt", str(files["weights.pth"]),
                      "--dataset", str(data), "--HWdes", str(files["space.ini"]), "--cycle", "1",
                      "--out", str(tmp_path / "b.jsonl"), "--device", "cpu"])
    err = error_of(capsys, code)
    assert "[1, 3, 8, 8]" in err and "[N, 1, H, W]" in err
