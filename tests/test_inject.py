"""Error injection (nipa.estimation.inject) and wrap_error.py: exactness without errors, determinism, the injected
variances against their formulas, stuck-at faults, every variation type, cellBit 2, layer selection,
and wrap_error.py end to end on a tiny ground truth."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from nipa.estimation.inject import (
    DEFAULT_METHOD,
    AdcCalibration,
    InjectedConv2d,
    InjectedLinear,
    inject,
    injected_layers,
    redraw,
)
from nipa.estimation.metric import layer_slice_noise
from nipa.estimation.stats import model_statistics
from nipa.hardware.config import VARI_TYPES, HWConfig
from nipa.hardware.quant import fake_quantize_input, fake_quantize_weight, quantize_input
from nipa.results.records import read_records
from nipa.simulator.crossbar import calibrate_adc, convert


class TinyNet(nn.Module):
    """A conv (fan-in 27, one partial tile) and two linears (fan-in 200 over two tiles of 128)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8 * 5 * 5, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc(x)))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture()
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def fake_quantized(model: nn.Module, hw: HWConfig) -> nn.Module:
    """The reference: per-(channel, tile) weight quantization, per-tensor input quantization."""
    import copy

    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = fake_quantize_weight(module.weight.data, hw.wl_weight, hw.subArray)
            module.register_forward_pre_hook(lambda _m, args: (fake_quantize_input(args[0], hw.wl_input),))
    return reference


@pytest.mark.parametrize("cell_bits, weight_bits", [(1, 8), (2, 5), (1, 4)])
def test_no_error_equals_fake_quantized_model_exactly(net, cell_bits, weight_bits):
    hw = HWConfig(wl_weight=weight_bits, wl_input=6, subArray=128, ADCprecision=24, cellBit=cell_bits)
    x = torch.randn(4, 3, 10, 10)
    expected = fake_quantized(net, hw)(x)
    for method in ("published", "calibrated"):
        exact = inject(net, hw, method=method, adc="none")
        assert torch.equal(exact(x), expected), method
    # A 24-bit ADC adds only noise far below float32 resolution.
    calibration = AdcCalibration(net, [torch.randn(8, 3, 10, 10)])
    for method in ("published", "calibrated"):
        nearly = inject(net, hw, method=method, calibration=calibration)
        torch.testing.assert_close(nearly(x), expected, rtol=1e-5, atol=1e-5)
    # The simulator with an ideal ADC computes the same model.
    torch.testing.assert_close(convert(net, hw)(x), expected, rtol=1e-4, atol=1e-4)


def test_layers_are_replaced_and_exclusion_leaves_layers_untouched(net):
    hw = HWConfig(wl_weight=6, subArray=64, ADCprecision=5, vari=0.2)
    injected = inject(net, hw, exclude=["out"])
    assert isinstance(injected.conv, InjectedConv2d) and isinstance(injected.fc, InjectedLinear)
    assert type(injected.out) is nn.Linear
    assert torch.equal(injected.out.weight, net.out.weight) and torch.equal(injected.out.bias, net.out.bias)
    assert [layer.core.name for layer in injected_layers(injected)] == ["conv", "fc"]
    assert type(net.conv) is nn.Conv2d  # the input model is untouched
    assert not torch.equal(injected.fc.weight, net.fc.weight)


def test_deterministic_per_seed_and_draw(net):
    hw = HWConfig(wl_weight=6, subArray=64, ADCprecision=5, vari=0.1, SAF_prop=0.01)
    for method in ("published", "calibrated"):
        kwargs = {"method": method, "calibration": AdcCalibration(net, [torch.randn(8, 3, 10, 10)])}
        a = inject(net, hw, seed=3, draw=1, **kwargs)
        b = inject(net, hw, seed=3, draw=1, **kwargs)
        assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(a.conv.weight, b.conv.weight)
        assert not torch.equal(a.fc.weight, inject(net, hw, seed=3, draw=2, **kwargs).fc.weight)
        assert not torch.equal(a.fc.weight, inject(net, hw, seed=4, draw=1, **kwargs).fc.weight)
        redraw(b, 3, 2)  # redraw in place == a fresh conversion of that draw
        assert torch.equal(b.fc.weight, inject(net, hw, seed=3, draw=2, **kwargs).fc.weight)


def integer_error(layer: nn.Linear, injected: nn.Module, hw: HWConfig) -> torch.Tensor:
    """Injected minus quantized weight in integer levels, [out, T, rows]."""
    from nipa.hardware.quant import quantize_weight_tiles, tile_columns

    rows = min(hw.subArray, layer.in_features)
    q, scale = quantize_weight_tiles(tile_columns(layer.weight.detach(), rows), hw.wl_weight)
    return tile_columns(injected.weight.detach(), rows) / scale.unsqueeze(-1) - q


def test_published_weight_noise_variance_matches_the_formula():
    torch.manual_seed(1)
    layer = nn.Linear(1024, 512)
    model = nn.Sequential(layer)
    hw = HWConfig(wl_weight=6, subArray=128, ADCprecision=4, vari_type="laplace", laplace_b=0.15)
    stats = model_statistics(model, [(6, 128, 1)])
    terms = layer_slice_noise(stats, hw)
    significance = torch.tensor([4.0**k for k in range(hw.num_slices)], dtype=torch.float64)
    expected = float((torch.as_tensor(terms["total"][0]) * significance).sum())
    error = integer_error(layer, inject(model, hw, stats=stats)[0], hw)
    assert error.var().item() == pytest.approx(expected, rel=0.03)
    assert abs(error.mean().item()) < 0.02 * expected**0.5


def test_cell_model_weight_error_variance_state_dependent():
    torch.manual_seed(2)
    layer = nn.Linear(1024, 512)
    model = nn.Sequential(layer)
    hw = HWConfig(wl_weight=8, subArray=256, ADCprecision=8, vari=0.2)
    stats = model_statistics(model, [(8, 256, 1)])
    mean_sq = torch.as_tensor(stats.combos["w8_s256_c1"].mean_sq[0])
    significance = torch.tensor([4.0**k for k in range(hw.num_slices)], dtype=torch.float64)
    expected = float((0.2**2 * mean_sq * significance).sum())  # G (1 + N(0, vari)) on the one active cell
    error = integer_error(layer, inject(model, hw, method="calibrated", adc="none")[0], hw)
    assert error.var().item() == pytest.approx(expected, rel=0.05)


def test_stuck_at_fault_fractions():
    layer = nn.Linear(1024, 256, bias=False)
    layer.weight.data.fill_(0.5)  # 2-bit weights: every level is +1 (positive cell on, negative off)
    p = 0.05
    hw = HWConfig(wl_weight=2, subArray=128, ADCprecision=8, SAF_prop=p)
    levels = integer_error(layer, inject(layer, hw, method="calibrated", adc="none"), hw) + 1
    # A weight reads 0 when either its positive cell sticks at G_min or its negative cell at G_max,
    # and -1 when both do.
    assert (levels - levels.round()).abs().max() < 1e-5  # G_min leaks cancel up to 1/(R-1)
    fraction = {v: (levels.round() == v).float().mean().item() for v in (-1.0, 0.0, 1.0)}
    assert fraction[0.0] == pytest.approx(2 * p * (1 - p), abs=0.004)
    assert fraction[-1.0] == pytest.approx(p * p, abs=0.001)
    assert sum(fraction.values()) == pytest.approx(1.0)
    # Without faults the same layer reads exactly its levels.
    ideal_hw = HWConfig(wl_weight=2, subArray=128)
    clean = integer_error(layer, inject(layer, ideal_hw, method="calibrated", adc="none"), ideal_hw)
    assert clean.abs().max().item() == 0


@pytest.mark.parametrize("vari_type", VARI_TYPES)
@pytest.mark.parametrize("method", ["published", "calibrated"])
def test_every_variation_type_runs(net, vari_type, method):
    spreads = {"vari": 0.1, "ind_vari": 0.05, "laplace_b": 0.1}
    hw = HWConfig(wl_weight=6, subArray=64, ADCprecision=5, cellBit=2, vari_type=vari_type,
                  SAF_prop=1e-3, **spreads)
    x = torch.randn(4, 3, 10, 10)
    injected = inject(net, hw, method=method, calibration=AdcCalibration(net, [x]))
    y = injected(x)
    assert torch.isfinite(y).all()
    ideal = inject(net, HWConfig(wl_weight=6, subArray=64, cellBit=2), adc="none")
    assert not torch.equal(injected.fc.weight, ideal.fc.weight)


@pytest.mark.parametrize("adc_form", ["weight", "output", "conditional"])
def test_measured_adc_error_power_matches_the_simulator(adc_form):
    """The measured ADC error, injected in either form, has the simulator's output error power
    (no device error, dynamic 4-bit ADC, unstructured inputs; calibrated on other inputs)."""
    torch.manual_seed(3)
    layer = nn.Linear(512, 256, bias=False)
    hw = HWConfig(wl_weight=8, wl_input=8, subArray=128, ADCprecision=4)
    x = torch.randn(256, 512)
    reference = inject(layer, hw, method="calibrated", adc="none")(x)
    simulated = (convert(layer, hw)(x) - reference).pow(2).mean().item()
    calibration = AdcCalibration(layer, [torch.randn(256, 512)])
    injected = [inject(layer, hw, method="calibrated", adc_form=adc_form, calibration=calibration, draw=d)
                for d in range(4)]
    predicted = sum((m(x) - reference).pow(2).mean().item() for m in injected) / len(injected)
    assert 0.75 < predicted / simulated < 1.33


def test_conditional_form_holds_an_error_that_is_a_function_of_the_read():
    """With one input bit, one slice and one tile, each output is one read: an ADC with a fixed range
    (calibrated mode) makes an error that is a function of the ideal output, which the conditional
    form reproduces point by point (up to its bin width), where the output form draws noise of the
    same power. (A dynamic range moves its grid with every batch, so there only the part of the
    function that all batches share is held.)"""
    torch.manual_seed(5)
    layer = nn.Linear(128, 32, bias=False)
    hw = HWConfig(wl_weight=4, wl_input=2, subArray=128, ADCprecision=3, cellBit=3, adc_mode="calibrated")
    assert hw.num_slices == 1
    batches = [torch.randn(512, 128) for _ in range(2)]
    x = torch.randn(512, 128)
    reference = inject(layer, hw, method="calibrated", adc="none")(x)
    chip = convert(layer, hw)
    calibrate_adc(chip, batches)
    simulated = chip(x) - reference
    calibration = AdcCalibration(layer, batches)
    conditional = inject(layer, hw, method="conditional", calibration=calibration)
    assert conditional.core.conditional_bins > 0
    miss_conditional = (conditional(x) - reference - simulated).pow(2).mean()
    output = inject(layer, hw, method="calibrated", calibration=calibration)
    miss_output = (output(x) - reference - simulated).pow(2).mean()
    assert miss_conditional < 0.25 * miss_output
    assert miss_conditional < 0.25 * simulated.pow(2).mean()


def test_calibration_reads_through_a_programmed_chip_where_the_point_has_device_error():
    """Variation widens the reads, a dynamic range widens with them and so does the ADC step: the
    calibration through one programmed chip measures a larger ADC error, close to the simulator's
    (its error with this ADC minus its error with a 16-bit one, same chip); without device error both
    calibrations are the same."""
    torch.manual_seed(7)
    layer = nn.Linear(128, 64, bias=False)
    hw = HWConfig(wl_weight=6, wl_input=6, subArray=128, ADCprecision=3, vari=0.3)
    batches = [torch.randn(256, 128)]
    through_chip = AdcCalibration(layer, batches, device_reads=True).errors(hw)[""].output_power.mean()
    ideal_reads = AdcCalibration(layer, batches).errors(hw)[""].output_power.mean()
    assert through_chip > 1.05 * ideal_reads
    x = batches[0]
    fine = replace(hw, ADCprecision=16)
    per_channel = sum((convert(layer, hw, chip=chip)(x) - convert(layer, fine, chip=chip)(x)).pow(2).mean(0)
                      for chip in range(3)) / 3
    # In integer units, as the calibration measures it: divided by (scale_in scale_w[o])^2 (one tile).
    units = (convert(layer, hw).core.weight_scale[:, 0] * quantize_input(x, hw.wl_input)[1]) ** 2
    simulated = (per_channel / units).mean()
    assert abs(through_chip / simulated - 1) < abs(ideal_reads / simulated - 1)
    plain = HWConfig(wl_weight=6, wl_input=6, subArray=128, ADCprecision=3)
    assert torch.equal(AdcCalibration(layer, batches, device_reads=True).errors(plain)[""].output_power,
                       AdcCalibration(layer, batches).errors(plain)[""].output_power)


def test_calibration_pools_its_batches():
    """Several calibration batches: the measured power is their mean (each batch has its own dynamic
    range, and the test set's batches differ as much)."""
    torch.manual_seed(6)
    layer = nn.Linear(64, 16, bias=False)
    hw = HWConfig(wl_weight=6, wl_input=6, subArray=64, ADCprecision=3)
    batches = [torch.randn(32, 64), 3 * torch.randn(32, 64)]
    single = [AdcCalibration(layer, [b]).errors(hw)[""].output_power for b in batches]
    pooled = AdcCalibration(layer, batches).errors(hw)[""].output_power
    assert torch.allclose(pooled, (single[0] + single[1]) / 2, rtol=1e-6)
    assert not torch.allclose(single[0], single[1], rtol=0.1)


def test_output_noise_is_fresh_per_forward_and_repeats_per_draw(net):
    hw = HWConfig(wl_weight=6, subArray=64, ADCprecision=4)
    x = torch.randn(8, 3, 10, 10)
    calibration = AdcCalibration(net, [torch.randn(16, 3, 10, 10)])
    model = inject(net, hw, method="calibrated", calibration=calibration, draw=0)
    assert model.fc.core.output_std is not None and float(model.fc.core.output_std.max()) > 0
    first, second = model(x), model(x)
    assert not torch.equal(first, second)  # a new ADC error on every read
    redraw(model, 0, 0)
    assert torch.equal(model(x), first)  # the same draw on the same data repeats
    assert torch.equal(inject(net, hw, method="calibrated", calibration=calibration, draw=0)(x), first)


def test_output_noise_lives_on_the_layers_device_and_follows_to(net, device):
    """Converted on the CPU, moved with .to(): the output noise scale is a buffer already on the device
    (no host-to-device copy in the forward) and the noise stream is made where the outputs are."""
    hw = HWConfig(wl_weight=6, subArray=64, ADCprecision=4)
    x = torch.randn(8, 3, 10, 10)
    calibration = AdcCalibration(net, [torch.randn(16, 3, 10, 10)])
    model = inject(net, hw, method="calibrated", calibration=calibration, draw=0)
    reference = model(x)
    core = model.fc.core
    assert "output_std" in dict(core.named_buffers()) and "output_std" not in core.state_dict()
    model.to(device)
    assert core.output_std.device.type == device.type
    x_dev = x.to(device)
    redraw(model, 0, 0)
    first = model(x_dev)
    assert model.fc.output_generator.device.type == device.type
    redraw(model, 0, 0)
    assert torch.equal(model(x_dev), first)  # the draw restarts on the new device too
    if device.type == "cpu":
        assert torch.equal(first, reference)  # same device, same stream: moving changed nothing
    model.to(torch.float64)
    assert core.output_std.dtype == torch.float64
    redraw(model, 0, 0)
    wide = model(x_dev.double())
    assert wide.dtype == torch.float64 and torch.isfinite(wide).all()
    assert not torch.equal(wide, model(x_dev.double()))  # still fresh noise per forward


def test_paired_draws_carry_the_simulated_chips_cells(net):
    hw = HWConfig(wl_weight=6, subArray=64, ADCprecision=24, vari=0.2, SAF_prop=0.01)
    x = torch.randn(4, 3, 10, 10)
    for chip in (0, 2):
        paired = inject(net, hw, method="calibrated", adc="none", draw=chip, paired=True)
        torch.testing.assert_close(paired(x), convert(net, hw, chip=chip)(x), rtol=1e-4, atol=1e-4)
    independent = inject(net, hw, method="calibrated", adc="none", draw=0)
    assert not torch.allclose(independent(x), convert(net, hw, chip=0)(x), rtol=1e-3, atol=1e-3)


# ---- wrap_error.py end to end -----------------------------------------------------------------------

SPACE = """
[Algorithm_Level]
wl_weight = 6
wl_input = 6
[Hardware_Level]
subArray = 64
ADCprecision = 4, 6
[Device_Level]
vari = 0.0, 0.2
"""


@pytest.fixture(scope="module")
def ground_truth(digits_ckpt_dir, tmp_path_factory):
    import main

    folder = tmp_path_factory.mktemp("wrap")
    space = folder / "space.ini"
    space.write_text(SPACE)
    out = folder / "digits_accsim.jsonl"
    assert main.main(["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "0", "--cycle", "2", "--batch_size", "100", "--limit", "200",
                      "--device", "cpu", "--out", str(out)]) == 0
    return folder, out


def run_wrap(ckpt_dir, truth, out, *extra):
    import wrap_error

    return wrap_error.main(["--dataset", "digits", "--ckpt_dir", str(ckpt_dir), "--ground_truth", str(truth),
                            "--out", str(out), "--cycle", "2", "--time_points", "1", "--device", "cpu",
                            *extra])


def test_wrap_error_end_to_end(digits_ckpt_dir, ground_truth, capsys):
    folder, truth = ground_truth
    out = folder / "digits_wrap.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--log_file", str(folder / "wrap.log")) == 0
    everything = read_records(out)
    records = [r for r in everything if r["method"] == "fast"]
    checks = [r for r in everything if r["method"] == "adc_check"]
    assert len(records) == 4 * 2 and len(everything) == 4 * 2 + 4  # and one trust check per point
    assert {r["config_key"] for r in checks} == {r["config_key"] for r in records}
    assert all(set(r["relative_adc_error"]) == {"conv1", "conv2", "conv3", "fc1", "fc2"} for r in checks)
    for key in ("config", "config_key", "draw", "top1", "wall_s", "run", "injection", "samples"):
        assert key in records[0], key
    assert records[0]["samples"] == 200  # the ground truth's test data (its --limit)
    summary = json.loads((folder / "digits_wrap_summary.json").read_text())
    assert summary["points"] == 4 and summary["cycle"] == 2
    for key in ("mean_abs_error", "max_abs_error", "kendall_tau", "timing"):
        assert key in summary, key
    timing = summary["timing"]
    assert timing["points"] == 1 and timing["simulated_s"] > 0 and timing["fast_s"] > 0
    row = timing["rows"][0]
    assert row["speedup"] == pytest.approx(row["simulated_s"] / row["fast_s"])
    assert (folder / "digits_wrap.png").stat().st_size > 0
    for row in summary["rows"]:
        assert row["predicted"] == pytest.approx(sum(row["draws"]) / 2)  # the mean, not the nearest draw
        assert len(row["chips"]) == 2
    assert summary["trust"]["trusted"]["points"] + summary["trust"]["untrusted"]["points"] == 4
    # Resumes: a second run adds no record.
    assert run_wrap(digits_ckpt_dir, truth, out, "--time_points", "0") == 0
    assert len(read_records(out)) == 12
    assert "already recorded" in capsys.readouterr().out


def test_wrap_error_published_needs_statistics_and_says_how(digits_ckpt_dir, ground_truth, tmp_path, capsys):
    _, truth = ground_truth
    assert run_wrap(digits_ckpt_dir, truth, tmp_path / "w.jsonl", "--method", "published",
                    "--stats", str(tmp_path / "missing.json")) == 2
    assert "python stat.py --model_name smallcnn --dataset digits --HWdes" in capsys.readouterr().err


def test_wrap_error_without_ground_truth_says_which_command(digits_ckpt_dir, tmp_path, capsys):
    assert run_wrap(digits_ckpt_dir, tmp_path / "none.jsonl", tmp_path / "w.jsonl") == 2
    assert "python main.py --model_name smallcnn --dataset digits" in capsys.readouterr().err


def load_stat_script():
    """The project's stat.py (its name is taken by the standard library's stat module)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "stat.py"
    spec = importlib.util.spec_from_file_location("nipa_stat_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wrap_error_published_method_with_statistics(digits_ckpt_dir, ground_truth, tmp_path):
    folder, truth = ground_truth
    stats = tmp_path / "stats.json"
    assert load_stat_script().main(["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--HWdes",
                                    str(folder / "space.ini"), "--out", str(stats)]) == 0
    out = tmp_path / "w.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--method", "published", "--stats", str(stats),
                    "--cycle", "1", "--time_points", "0") == 0
    records = read_records(out)
    assert len(records) == 4 and records[0]["injection"] == "device=formula,adc=formula"
    assert (tmp_path / "w_published_summary.json").is_file()  # named after --out and the method


def test_wrap_error_planes_method(digits_ckpt_dir, ground_truth, tmp_path):
    """--method planes end to end: its records name the form, and they are its own (not the default's)."""
    folder, truth = ground_truth
    out = tmp_path / "w.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--method", "planes", "--cycle", "1", "--time_points", "0") == 0
    records = [r for r in read_records(out) if r["method"] == "fast"]
    assert len(records) == 4 and records[0]["injection"] == "device=cells,adc=measured,adc_form=planes"
    summary = json.loads((tmp_path / "w_planes_summary.json").read_text())
    assert summary["points"] == 4 and 0 <= summary["mean_abs_error"] < 100


def test_wrap_error_calibrates_on_the_simulators_activations_when_asked(digits_ckpt_dir, ground_truth, tmp_path):
    """--calib_upstream simulated with the calibrated method (its own: the ideal model's activations): its
    records say so in their settings (so they never average with the ideal upstream's) and its summary is
    named apart."""
    folder, truth = ground_truth
    out = tmp_path / "w.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--method", "calibrated", "--calib_upstream", "simulated",
                    "--cycle", "1", "--time_points", "0") == 0
    records = [r for r in read_records(out) if r.get("method") == "fast"]
    assert records and all(r["run"]["calib_upstream"] == "simulated" for r in records)
    summary = json.loads((tmp_path / "w_calibrated-simulated_summary.json").read_text())
    assert summary["injection"].endswith("calibrated on the simulated activations")  # the plot's title too
    plain = tmp_path / "plain.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, plain, "--method", "calibrated", "--cycle", "1", "--time_points", "0") == 0
    assert all("calib_upstream" not in r["run"] for r in read_records(plain) if r.get("method") == "fast")


@pytest.mark.parametrize("method", ["planes", "repeated"])
def test_wrap_error_times_the_forms_own_calibration_apart(digits_ckpt_dir, ground_truth, tmp_path, monkeypatch,
                                                         method):
    """The timed calibration measures what the planes or repeated form needs, so the timed draws measure
    nothing (they did: the timing calibrated the output form's tables and the draws the planes' again);
    the summary is named after the method unless it is the default."""
    folder, truth = ground_truth
    calls = []
    measure = AdcCalibration._measure

    def counting(self, hw, bits, conditional=False, planes=False, repeated=False):
        if not self.device_reads:  # the trust check's device-read part measures the output form on purpose
            calls.append({"planes": planes, "repeated": repeated}[method])
        return measure(self, hw, bits, conditional, planes, repeated)

    monkeypatch.setattr(AdcCalibration, "_measure", counting)
    out = tmp_path / "w.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--method", method, "--cycle", "1", "--time_points", "1") == 0
    assert calls and all(calls)
    name = "w_summary.json" if method == DEFAULT_METHOD else f"w_{method}_summary.json"  # the default: no tag
    summary = json.loads((tmp_path / name).read_text())
    assert f"adc_form={method}" in summary["injection"]


def test_wrap_error_reads_the_test_set_in_the_ground_truths_orders(digits_ckpt_dir, tmp_path, monkeypatch):
    """A ground truth made with --test_order per_chip: draw d reads the test set in chip d + 1's order (a
    per-tensor input scale and a dynamic range are one batch's), and the records say so; a fixed-order
    ground truth keeps the loader's order and records nothing new (its old records still resume)."""
    import main
    from nipa.pipelines import wrap

    space = tmp_path / "space.ini"
    space.write_text(SPACE)
    truth = tmp_path / "digits_accsim.jsonl"
    assert main.main(["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "0", "--cycle", "2", "--batch_size", "100", "--limit", "200",
                      "--device", "cpu", "--test_order", "per_chip", "--out", str(truth)]) == 0
    orders = []
    original = wrap.chip_order

    def recording(data, seed, chip):
        orders.append(chip)
        return original(data, seed, chip)

    monkeypatch.setattr(wrap, "chip_order", recording)
    out = tmp_path / "w.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--time_points", "0") == 0
    assert orders == [1, 2] * 4  # two draws at each of the four points
    records = [r for r in read_records(out) if r.get("method") == "fast"]
    assert records and all(r["run"]["test_order"] == "per_chip" for r in records)
    orders.clear()
    fixed = tmp_path / "fixed_accsim.jsonl"
    assert main.main(["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "0", "--cycle", "1", "--batch_size", "100", "--limit", "200",
                      "--device", "cpu", "--out", str(fixed)]) == 0
    assert run_wrap(digits_ckpt_dir, fixed, tmp_path / "f.jsonl", "--time_points", "0") == 0
    assert orders == [] and all("test_order" not in r["run"] for r in read_records(tmp_path / "f.jsonl")
                                if r.get("method") == "fast")


def test_wrap_error_adds_draws_until_the_estimates_standard_error_is_small(digits_ckpt_dir, ground_truth, tmp_path):
    """--target_se: draws are added to a point until the standard error of their mean is at most the
    target or --max_cycle is reached (at least --cycle); the prediction is the mean of all its draws; a
    rerun resumes without a new draw; --max_cycle without --target_se is refused."""
    import statistics

    import wrap_error

    _, truth = ground_truth
    out = tmp_path / "adaptive.jsonl"
    arguments = ["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--ground_truth", str(truth),
                 "--out", str(out), "--cycle", "2", "--time_points", "0", "--device", "cpu",
                 "--target_se", "0.01", "--max_cycle", "5"]
    assert wrap_error.main(arguments) == 0
    draws: dict[str, dict[int, float]] = {}
    for r in read_records(out):
        if r["method"] == "fast":
            draws.setdefault(r["config_key"], {})[r["draw"]] = r["top1"]
    assert len(draws) == 4
    for values in draws.values():
        assert sorted(values) == list(range(len(values))) and 2 <= len(values) <= 5
        spread = statistics.stdev(values.values()) / len(values) ** 0.5
        assert len(values) == 5 or spread <= 0.01
    assert any(len(values) > 2 for values in draws.values())  # variation 0.2: draws differ
    summary = json.loads((tmp_path / "adaptive_summary.json").read_text())
    assert summary["target_se"] == 0.01 and summary["max_cycle"] == 5
    for row in summary["rows"]:
        assert row["predicted"] == pytest.approx(statistics.mean(draws[row["config_key"]].values()))
    before = len(read_records(out))
    assert wrap_error.main(arguments) == 0 and len(read_records(out)) == before  # resumed, nothing new
    assert wrap_error.main(arguments[:-4] + ["--max_cycle", "5"]) == 2  # argparse's error


# ----------------------------------------------------------------------------------------------------
# How far to trust the estimate: its ADC error relative to the signal (nipa.estimation.reliability)
# ----------------------------------------------------------------------------------------------------


def test_relative_adc_error_falls_with_adc_bits_and_ignores_the_device(net):
    """The ratio is the ADC's part alone: the same with and without device variation, near 0 at a fine
    ADC, largest at a coarse one; and `trusted` applies the threshold to the largest layer."""
    from nipa.estimation.inject import InjectionModel
    from nipa.estimation.reliability import TRUST_RATIO, relative_adc_error, trusted

    torch.manual_seed(0)
    batches = [torch.randn(64, 3, 10, 10) for _ in range(2)]
    calibration = AdcCalibration(net, batches, upstream="simulated")
    errors = InjectionModel.of("repeated")
    ratios = {}
    for bits in (3, 5, 8, 12):
        hw = HWConfig(wl_weight=4, wl_input=4, subArray=32, ADCprecision=bits, cellBit=1)
        ratios[bits] = relative_adc_error(net, hw, errors, calibration, batches[:1])
        assert set(ratios[bits]) == {layer.core.name for layer in injected_layers(inject(net, hw))}
    worst = {bits: max(r.values()) for bits, r in ratios.items()}
    assert worst[3] > worst[5] > worst[8] > worst[12] and worst[12] < 0.01 and worst[3] > TRUST_RATIO
    noisy = HWConfig(wl_weight=4, wl_input=4, subArray=32, ADCprecision=5, cellBit=1, vari=0.3, SAF_prop=0.01)
    assert relative_adc_error(net, noisy, errors, calibration, batches[:1]) == pytest.approx(ratios[5])
    assert trusted(ratios[12]) is True and trusted(ratios[3]) is False and trusted(None) is None
    assert trusted({"a": 0.05, "b": 0.2}, limit=0.25) is True and trusted({"a": 0.05, "b": 0.2}) is False


def test_device_reads_part_of_the_trust_check_sees_stuck_cells_widen_the_range(net):
    """Stuck-at faults on 3-bit cells read up to 7 levels off and widen a dynamic range: the ADC error through
    a programmed chip is larger than on ideal reads, the device itself stays off (so a 12-bit ADC is still
    near 0), there is no device part without device error, and TrustCheck judges the larger part."""
    from nipa.estimation.inject import InjectionModel
    from nipa.estimation.reliability import TrustCheck, device_read_adc_error, relative_adc_error, trusted

    torch.manual_seed(0)
    batches = [torch.randn(64, 3, 10, 10) for _ in range(2)]
    calibration = AdcCalibration(net, batches, upstream="simulated")
    errors = InjectionModel.of("repeated")
    stuck = HWConfig(wl_weight=6, wl_input=6, subArray=32, ADCprecision=6, cellBit=3, SAF_prop=0.05)
    ideal_reads = relative_adc_error(net, stuck, errors, calibration, batches[:1])
    device_reads = device_read_adc_error(net, stuck, batches[:1])
    assert set(device_reads) == set(ideal_reads)
    assert max(device_reads.values()) > 1.3 * max(ideal_reads.values())
    assert device_read_adc_error(net, stuck, batches[:1]) == device_reads  # seeded: the same chip
    fine = dataclasses.replace(stuck, ADCprecision=12)
    assert max(device_read_adc_error(net, fine, batches[:1]).values()) < 0.01
    assert device_read_adc_error(net, dataclasses.replace(stuck, SAF_prop=0.0), batches[:1]) == {}
    check = TrustCheck({"a": 0.05, "b": 0.02}, {"a": 0.01, "b": 0.3})
    assert check.ratios == {"a": 0.05, "b": 0.3} and trusted(check.ratios) is False
    assert TrustCheck({"a": 0.05}).ratios == {"a": 0.05}


def test_wrap_error_adds_the_trust_check_to_records_made_before_it(digits_ckpt_dir, ground_truth, tmp_path):
    """A records file without checks (made before they existed) gets one per point on its next run, no
    new draw; a third run adds nothing; the summary's trust regions count every point."""
    _, truth = ground_truth
    out = tmp_path / "old.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--cycle", "1", "--time_points", "0") == 0
    draws = [r for r in read_records(out) if r["method"] == "fast"]
    out.write_text("".join(json.dumps(r) + "\n" for r in draws))  # as an older file: draws only
    assert run_wrap(digits_ckpt_dir, truth, out, "--cycle", "1", "--time_points", "0") == 0
    records = read_records(out)
    assert [r for r in records if r["method"] == "fast"] == draws
    checks = [r for r in records if r["method"] == "adc_check"]
    assert sorted(r["config_key"] for r in checks) == sorted(r["config_key"] for r in draws)
    assert run_wrap(digits_ckpt_dir, truth, out, "--cycle", "1", "--time_points", "0") == 0
    assert len(read_records(out)) == len(records)
    trust = json.loads((tmp_path / "old_summary.json").read_text())["trust"]
    assert trust["trusted"]["points"] + trust["untrusted"]["points"] == 4 and trust["unchecked_points"] == 0
    # A check made before its device-read part existed is made again, once; the newest one is read.
    older = [{k: v for k, v in r.items() if k != "adc_error_device_reads"} if r["method"] == "adc_check" else r
             for r in records]
    for r in older:
        if r["method"] == "adc_check":
            r["relative_adc_error"] = dict.fromkeys(r["relative_adc_error"], 0.0)  # would trust every point
    out.write_text("".join(json.dumps(r) + "\n" for r in older))
    assert run_wrap(digits_ckpt_dir, truth, out, "--cycle", "1", "--time_points", "0") == 0
    again = read_records(out)
    assert len(again) == len(records) + len(checks)
    assert [r for r in again if r["method"] == "fast"] == draws
    assert run_wrap(digits_ckpt_dir, truth, out, "--cycle", "1", "--time_points", "0") == 0
    assert len(read_records(out)) == len(again)
    assert json.loads((tmp_path / "old_summary.json").read_text())["trust"] == trust


def test_wrap_error_simulates_the_untrusted_points_when_asked(digits_ckpt_dir, ground_truth, tmp_path):
    """--untrusted simulate: every untrusted point (and only those) gets chips of the simulator with the
    ground truth's seed + FALLBACK_SEED_OFFSET, the records main.py writes with that seed; its prediction is
    their mean, the summary compares it with the estimate alone, and a second run resumes."""
    import main
    from nipa.pipelines.wrap import FALLBACK_SEED_OFFSET, untrusted_keys

    _, truth = ground_truth
    out = tmp_path / "adaptive.jsonl"
    assert run_wrap(digits_ckpt_dir, truth, out, "--untrusted", "simulate", "--time_points", "0") == 0
    untrusted = set(untrusted_keys(read_records(out)))
    assert untrusted, "the space's 4-bit ADC points should be untrusted"
    fallback = read_records(tmp_path / "adaptive_untrusted_accsim.jsonl")
    chips = [r for r in fallback if r["method"] == "sliced"]
    assert {r["config_key"] for r in chips} == untrusted and len(chips) == 2 * len(untrusted)
    truth_seed = read_records(truth)[0]["seed"]
    assert {r["seed"] for r in fallback} == {truth_seed + FALLBACK_SEED_OFFSET}
    summary = json.loads((tmp_path / "adaptive_adaptive_summary.json").read_text())
    fidelity = summary["fidelity"]
    assert fidelity["simulated_points"] == len(untrusted) and fidelity["chips"] == len(chips)
    assert fidelity["estimated_points"] == 4 - len(untrusted)
    for row in summary["rows"]:
        if row["config_key"] in untrusted:
            mine = [r["top1"] for r in chips if r["config_key"] == row["config_key"]]
            assert row["source"] == "simulated" and row["predicted"] == pytest.approx(sum(mine) / len(mine))
            assert row["estimate"] == pytest.approx(sum(row["draws"]) / len(row["draws"]))
        else:
            assert row["source"] == "estimate" and "estimate" not in row
    errors = [abs(r["estimate"] - r["simulated"]) if "estimate" in r else r["abs_error"] for r in summary["rows"]]
    assert fidelity["estimate_only"]["mean_abs_error"] == pytest.approx(sum(errors) / 4)
    # Other chips than the ground truth's where chips differ, and the very chips main.py makes with that seed.
    varied = [r for r in chips if r["config"]["vari"] > 0]
    if varied:
        truth_chips = {(r["config_key"], r["chip"]): r["top1"] for r in read_records(truth) if r["method"] == "sliced"}
        assert any(truth_chips[(r["config_key"], r["chip"])] != r["top1"] for r in varied)
    point = chips[0]["config"]
    space = tmp_path / "one.ini"
    space.write_text("[Algorithm_Level]\nwl_weight = {wl_weight}\nwl_input = {wl_input}\n[Hardware_Level]\n"
                     "subArray = {subArray}\nADCprecision = {ADCprecision}\n[Device_Level]\nvari = {vari}\n"
                     .format(**point))
    again = tmp_path / "again.jsonl"
    assert main.main(["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "0", "--cycle", "2", "--batch_size", "100", "--limit", "200", "--device", "cpu",
                      "--seed", str(truth_seed + FALLBACK_SEED_OFFSET), "--out", str(again)]) == 0
    assert sorted(r["top1"] for r in read_records(again) if r["method"] == "sliced") == sorted(
        r["top1"] for r in chips if r["config_key"] == chips[0]["config_key"])
    assert run_wrap(digits_ckpt_dir, truth, out, "--untrusted", "simulate", "--time_points", "0") == 0
    assert len(read_records(tmp_path / "adaptive_untrusted_accsim.jsonl")) == len(fallback)


def test_wrap_error_untrusted_simulate_needs_a_trust_check(digits_ckpt_dir, ground_truth, tmp_path, capsys):
    _, truth = ground_truth
    assert run_wrap(digits_ckpt_dir, truth, tmp_path / "p.jsonl", "--method", "published", "--untrusted",
                    "simulate") != 0
    assert "--untrusted simulate" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
