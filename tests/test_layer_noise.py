"""nipa.estimation.layer_noise and validate.py --layer_noise: the measured noise of the crossbar layers grows with
every error source, matches the float layer where the crossbar is exact, and is reported by validate.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import validate
from nipa.estimation.layer_noise import float_layer_io, measure_layer_noise, relative_noise_power
from nipa.estimation.stats import model_statistics, save_statistics
from nipa.hardware.config import HWConfig
from nipa.workloads.zoo import build_model, save_checkpoint
from tests.test_validate import record


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("smallcnn", "digits").eval()
    return model, torch.randn(32, 1, 8, 8)


def test_relative_noise_power_by_hand():
    reference = torch.tensor([1.0, -2.0, 2.0, 1.0])  # mean square 2.5
    assert relative_noise_power(reference + torch.tensor([0.5, 0.0, -0.5, 0.0]), reference) == pytest.approx(0.05)
    assert relative_noise_power(reference, reference) == 0.0
    assert np.isnan(relative_noise_power(torch.ones(3), torch.zeros(3)))


def test_float_layer_io_captures_every_layer(model_and_batch):
    model, batch = model_and_batch
    io = float_layer_io(model, ["conv1", "fc2"], batch)
    x, y = io["fc2"]
    assert torch.allclose(model.fc2(x), y) and io["conv1"][0].shape == batch.shape
    with pytest.raises(KeyError):
        float_layer_io(model, ["no_such_layer"], batch)


def test_noise_grows_with_every_error_source(model_and_batch):
    model, batch = model_and_batch
    points = [HWConfig(ADCprecision=8), HWConfig(ADCprecision=4), HWConfig(ADCprecision=8, vari=0.05),
              HWConfig(ADCprecision=8, vari=0.3), HWConfig(ADCprecision=8, wl_weight=4)]
    layers, noise = measure_layer_noise(model, points, batch, chips=2, progress=False)
    assert layers == ["conv1", "conv2", "conv3", "fc1", "fc2"] and noise.shape == (5, 5)
    clean, coarse_adc, small_vari, large_vari, low_bits = noise
    assert np.all(clean > 0) and np.all(clean < 1e-2)  # 8-bit everything: close to the float layer
    assert np.all(coarse_adc > clean) and np.all(low_bits > clean)
    assert np.all(small_vari > clean) and np.all(large_vari > 4 * small_vari)


def test_chips_average_and_deterministic_points_use_one_chip(model_and_batch):
    model, batch = model_and_batch
    noisy, exact = HWConfig(vari=0.2), HWConfig()
    _, one = measure_layer_noise(model, [noisy, exact], batch, chips=1, progress=False)
    _, three = measure_layer_noise(model, [noisy, exact], batch, chips=3, progress=False)
    _, again = measure_layer_noise(model, [noisy, exact], batch, chips=3, progress=False)
    np.testing.assert_array_equal(three, again)  # same seed, same chips, same numbers
    np.testing.assert_array_equal(one[1], three[1])  # no device error: every chip is the same
    assert not np.allclose(one[0], three[0])  # three chips average three different draws
    _, other_seed = measure_layer_noise(model, [noisy], batch, chips=3, seed=1, progress=False)
    assert not np.allclose(other_seed[0], three[0])
    with pytest.raises(ValueError, match="chips"):
        measure_layer_noise(model, [noisy], batch, chips=0)


def test_calibrated_adc_points_are_measured(model_and_batch):
    model, batch = model_and_batch
    _, noise = measure_layer_noise(model, [HWConfig(ADCprecision=5, adc_mode="calibrated")], batch, chips=1,
                                   progress=False)
    assert np.all(np.isfinite(noise)) and np.all(noise > 0)


def test_validate_layer_noise_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("smallcnn", "digits").eval()
    ckpt = tmp_path / "smallcnn_digits.pt"
    save_checkpoint(ckpt, model, {"model": "smallcnn", "dataset": "digits"})
    points = [HWConfig(ADCprecision=a, vari=v) for a in (8, 6, 4) for v in (0.0, 0.1, 0.3)]
    stats = model_statistics(model, {(8, 128, 1)}, model_name="smallcnn", dataset="digits",
                             metadata={"source": "test"})
    save_statistics(stats, tmp_path / "stats.json")
    lines = [record(None, None, 98.0)] + [record(p, c, 90.0 - 10 * p.vari - (8 - p.ADCprecision) + c * 0.01)
                                          for p in points for c in range(2)]
    (tmp_path / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--model_name", "smallcnn", "--dataset", "digits", "--records", str(tmp_path / "rec.jsonl"),
            "--stats", str(tmp_path / "stats.json"), "--out_dir", str(tmp_path / "out"), "--bootstrap", "50",
            "--no_plot", "--layer_noise", "--layer_noise_chips", "2", "--layer_noise_batch", "40",
            "--ckpt", str(ckpt)]
    assert validate.main(args) == 0
    printed = capsys.readouterr().out
    assert "measured layer noise (40 calibration inputs" in printed and "per-layer NIPA vs measured SNR, fc2" in printed
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "digits_nipa_points.csv")
    assert {"measured_log2_snr", "measured_log2_snr_conv1", "measured_log2_snr_fc2"} <= set(table.columns)
    # more variation, coarser ADC: lower measured SNR, at every ADC precision / variation
    by_point = table.set_index(["ADCprecision", "vari"])["measured_log2_snr"]
    assert by_point[(8, 0.0)] > by_point[(8, 0.1)] > by_point[(8, 0.3)]
    assert by_point[(8, 0.0)] > by_point[(6, 0.0)] > by_point[(4, 0.0)]
    check = json.loads((tmp_path / "out" / "digits_nipa_summary.json").read_text())["layer_noise"]
    assert check["inputs"] == 40 and check["chips"] == 2
    assert check["nipa_vs_measured"]["n"] == 9 and check["nipa_vs_measured"]["kendall"]["value"] > 0.5
    assert set(check["per_layer_nipa_vs_measured"]) == {"conv1", "conv2", "conv3", "fc1", "fc2"}


def test_validate_layer_noise_without_checkpoint_names_pretrain(tmp_path, capsys):
    points = [HWConfig(ADCprecision=a) for a in (8, 6, 4)]
    torch.manual_seed(0)
    stats = model_statistics(build_model("smallcnn", "digits"), {(8, 128, 1)}, model_name="smallcnn",
                             dataset="digits", metadata={"source": "test"})
    save_statistics(stats, tmp_path / "stats.json")
    lines = [record(None, None, 98.0)] + [record(p, 0, 90.0 + p.ADCprecision) for p in points]
    (tmp_path / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--model_name", "smallcnn", "--dataset", "digits", "--records", str(tmp_path / "rec.jsonl"),
            "--stats", str(tmp_path / "stats.json"), "--out_dir", str(tmp_path / "out"), "--no_plot",
            "--layer_noise", "--ckpt_dir", str(tmp_path / "none")]
    assert validate.main(args) == 2
    assert "pretrain.py --model_name smallcnn --dataset digits" in capsys.readouterr().err
