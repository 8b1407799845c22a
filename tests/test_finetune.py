"""The one-to-one MLC chip (nipa.simulator.mlc) and the device fine-tuning methods (nipa.pipelines.finetune,
finetune.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nipa.hardware.device_errors import chip_generator, program_pairs
from nipa.hardware.quant import fake_quantize_weight
from nipa.pipelines.finetune import (
    METHODS,
    TRAINABLE_MODE,
    FinetuneSettings,
    LayerMatcher,
    finetune_chip,
    noisy_weight,
    reestimate_bn,
)
from nipa.simulator.mlc import (
    ChipOptions,
    MLCLayer,
    calibrate_adc,
    chip_writes,
    convert_mlc,
    mlc_hw,
    mlc_layers,
    program_cells,
    reprogram_chip,
    set_trainable,
)


class Tiny(nn.Module):
    """conv-bn-relu, a digital-able conv, a linear head: enough to tell every parameter kind apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny() -> Tiny:
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():  # non-trivial running statistics
        model.bn1.running_mean.uniform_(-0.1, 0.1)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model


def test_one_to_one_levels_and_ideal_chip_equals_fake_quantized_layer(tiny):
    hw = mlc_hw(3)
    assert hw.wl_weight == 4 and hw.num_slices == 1
    layer = MLCLayer(tiny.conv2, hw, "conv2")
    levels = layer.levels
    assert torch.equal(levels, levels.round()) and levels.abs().max() == 7
    # One cell of each pair holds the magnitude, the other is off.
    assert torch.equal(layer.g_pos, levels.clamp(min=0)) and torch.equal(layer.g_neg, (-levels).clamp(min=0))
    expected = fake_quantize_weight(tiny.conv2.weight, 4, rows=tiny.conv2.weight[0].numel())
    torch.testing.assert_close(layer.effective_weight(), expected)
    x = torch.randn(2, 6, 8, 8)
    reference = nn.functional.conv2d(x, expected, tiny.conv2.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


def test_one_to_one_needs_a_single_slice(tiny):
    from nipa.hardware.config import HWConfig

    with pytest.raises(ValueError, match="one-to-one"):
        MLCLayer(tiny.fc, HWConfig(wl_weight=8, cellBit=2), "fc")


def test_program_cells_uses_the_shared_cell_model():
    hw = mlc_hw(2, "state_dependent", 0.3, SAF_prop=0.01)
    levels = torch.randint(-3, 4, (40, 30)).float()
    g_pos, g_neg = program_cells(levels, hw, chip_generator(1, 2, 3))
    torch.testing.assert_close(g_pos - g_neg, program_pairs(levels, hw, chip_generator(1, 2, 3)))


def test_programming_error_is_fixed_per_chip_and_reproducible(tiny):
    hw = mlc_hw(3, "state_dependent", 0.2)
    chip = convert_mlc(tiny, hw, seed=5, chip=1)
    x = torch.randn(4, 1, 8, 8)
    first = chip(x)
    torch.testing.assert_close(chip(x), first)  # fixed while it runs
    again = convert_mlc(tiny, hw, seed=5, chip=1)
    torch.testing.assert_close(again(x), first)  # same seed and chip, same chip
    other = convert_mlc(tiny, hw, seed=5, chip=2)
    assert not torch.allclose(other(x), first)
    # state_dependent: a programmed level d reads d (1 + N(0, vari)); the leak g0 is negligible at R = 1e8
    big = nn.Linear(400, 300)
    layer = MLCLayer(big, hw, "big")
    layer.program(seed=0, chip=0)
    on = layer.levels > 0
    relative = layer.g_pos[on] / layer.levels[on] - 1
    assert abs(relative.mean()) < 0.01 and abs(relative.std() - 0.2) < 0.01


def test_reprogram_writes_only_changed_cells_with_fresh_variation():
    hw = mlc_hw(3, "state_dependent", 0.2)
    layer = MLCLayer(nn.Linear(10, 4), hw, "fc")
    layer.program(seed=0, chip=0)
    with torch.no_grad():
        layer.levels.copy_(torch.tensor([2.0, 0, -1, 3] * 10).view(4, 10))
        layer.program(seed=0, chip=0)
    g_pos, g_neg = layer.g_pos.clone(), layer.g_neg.clone()
    assert layer.reprogram() == 0 and layer.writes == 0  # nothing moved: nothing written
    with torch.no_grad():
        layer.shadow[0, 0] = 3.2  # +2 -> +3: the positive cell only
        layer.shadow[0, 1] = -0.7  # 0 -> -1: the negative cell only
        layer.shadow[0, 2] = 1.0  # -1 -> +1: both cells
        layer.shadow[0, 3] = 3.4  # rounds to the same target: no write
    assert layer.reprogram() == 4 and layer.writes == 4 and chip_writes(layer) == 4
    assert layer.levels[0, :4].tolist() == [3.0, -1.0, 1.0, 3.0]
    changed = torch.zeros_like(g_pos, dtype=torch.bool)
    changed[0, :3] = True
    assert torch.equal(layer.g_pos[~changed], g_pos[~changed]) and torch.equal(layer.g_neg[~changed], g_neg[~changed])
    assert layer.g_pos[0, 0] != g_pos[0, 0] and layer.g_neg[0, 1] != g_neg[0, 1]
    assert layer.g_neg[0, 0] == g_neg[0, 0]  # the untouched cell of a rewritten pair keeps its state


def test_straight_through_gradient_reaches_the_cell_targets(tiny):
    chip = convert_mlc(tiny, mlc_hw(3, "state_dependent", 0.2), chip=0)
    names = set_trainable(chip, "cells")
    assert {"conv1.shadow", "conv2.shadow", "fc.shadow"} <= set(names)
    x = torch.randn(3, 1, 8, 8)
    layer = chip.fc
    weight = layer.effective_weight()
    weight.retain_grad()
    y = nn.functional.linear(torch.randn(3, 128), weight)
    y.square().sum().backward()
    # d weight / d shadow = scale (per output row): the read passes the gradient straight through.
    torch.testing.assert_close(layer.shadow.grad, weight.grad * layer.weight_scale[:, None])
    chip(x).sum().backward()
    assert chip.conv1.shadow.grad is not None and chip.conv1.shadow.grad.abs().sum() > 0
    # Digital mode: the targets take no gradient.
    set_trainable(chip, "digital")
    assert not chip.conv1.shadow.requires_grad


def test_trainable_sets(tiny):
    chip = convert_mlc(tiny, mlc_hw(3, "state_dependent", 0.2), exclude=["conv2"])
    assert set_trainable(chip, "none") == []
    digital = set(set_trainable(chip, "digital"))
    assert digital == {"conv1.col_gain", "conv1.col_offset", "bn1.weight", "bn1.bias",
                       "conv2.weight", "conv2.bias",  # kept digital
                       "fc.col_gain", "fc.col_offset", "fc.bias"}
    assert set(set_trainable(chip, "cells")) == digital | {"conv1.shadow", "fc.shadow"}
    with pytest.raises(ValueError):
        set_trainable(chip, "everything")
    assert set(TRAINABLE_MODE) == set(METHODS)
    assert TRAINABLE_MODE["proposed_cells"] == "cells"
    assert {TRAINABLE_MODE[m] for m in ("label_only", "proposed_digital")} == {"digital"}
    assert {TRAINABLE_MODE[m] for m in ("none", "bn_only", "vat", "vat_bn")} == {"none"}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """State entries that differ (NaN equals NaN: an uncalibrated ADC scale is NaN)."""
    return {k for k in before
            if not torch.allclose(before[k].double(), after[k].double(), rtol=0, atol=0, equal_nan=True)}


def _calibration(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 1, 8, 8), torch.randint(0, 5, (n,))


@pytest.mark.parametrize("method", ["label_only", "proposed_digital", "proposed_cells"])
def test_each_method_changes_only_its_trainable_set(tiny, method):
    hw = mlc_hw(3, "state_dependent", 0.3)
    teacher = convert_mlc(tiny, mlc_hw(3))
    chip = convert_mlc(tiny, hw, chip=0)
    before = {k: v.clone() for k, v in chip.state_dict().items()}
    images, labels = _calibration()
    settings = FinetuneSettings(epochs=2, batch_size=16, cell_lr=0.05, cell_epochs=1, reprogram_every=2)
    info = finetune_chip(chip, teacher, images, labels, settings, TRAINABLE_MODE[method],
                         use_teacher=method.startswith("proposed"), seed=0, device=torch.device("cpu"))
    after = chip.state_dict()
    changed = _changed(before, after)
    cell_state = {f"{n}.{b}" for n in ("conv1", "conv2", "fc") for b in ("levels", "g_pos", "g_neg", "shadow")}
    bn_stats = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    digital = {"conv1.col_gain", "conv1.col_offset", "conv2.col_gain", "conv2.col_offset", "conv2.bias",
               "bn1.weight", "bn1.bias", "fc.col_gain", "fc.col_offset", "fc.bias"}
    if method == "proposed_cells":
        assert info["writes"] > 0 and info["writes"] == chip_writes(chip)
        assert changed - digital - bn_stats <= cell_state and changed & cell_state
        assert set(info["trainable"]) == digital | {"conv1.shadow", "conv2.shadow", "fc.shadow"}
    else:
        assert info["writes"] == 0 and not changed & cell_state  # the cells are untouched
        assert changed <= digital | bn_stats and changed & digital
        assert set(info["trainable"]) == digital
    assert not any(p.requires_grad for p in chip.parameters())  # nothing left trainable afterwards


def test_bn_only_changes_running_statistics_only(tiny):
    chip = convert_mlc(tiny, mlc_hw(3, "state_dependent", 0.3))
    before = {k: v.clone() for k, v in chip.state_dict().items()}
    images, _ = _calibration()
    reestimate_bn(chip, [images[:16], images[16:]])  # equal batches: the mean of means
    after = chip.state_dict()
    changed = _changed(before, after)
    assert changed == {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert chip.bn1.momentum == 0.1 and not chip.training
    # Exact statistics of the chip's own activations over all the batches.
    features = chip.conv1(images)
    torch.testing.assert_close(chip.bn1.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_layer_matching_is_zero_on_an_ideal_chip_and_positive_on_a_varied_one(tiny):
    teacher = convert_mlc(tiny, mlc_hw(3))
    x = torch.randn(4, 1, 8, 8)
    for spread, expect_zero in ((0.0, True), (0.3, False)):
        chip = convert_mlc(tiny, mlc_hw(3, "state_dependent", spread))
        matcher = LayerMatcher(chip, teacher)
        chip(x)
        value = float(matcher.loss().detach())
        matcher.close()
        assert (value < 1e-10) == expect_zero


def test_vat_noise_follows_the_chip_and_passes_gradients():
    hw = mlc_hw(3, "state_dependent", 0.3)
    weight = torch.randn(6, 4, 3, 3, requires_grad=True)
    noisy = noisy_weight(weight, hw, chip_generator(0, 0, 0))
    ideal = fake_quantize_weight(weight.detach(), 4, rows=36)
    assert not torch.allclose(noisy, ideal)
    relative = ((noisy - ideal) / ideal)[ideal.abs() > 0]
    assert 0.2 < relative.std() < 0.4
    noisy.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones_like(weight))


def test_optional_input_quantization_read_noise_and_adc(tiny):
    x = torch.randn(4, 1, 8, 8)
    ideal = convert_mlc(tiny, mlc_hw(3))
    fine = convert_mlc(tiny, mlc_hw(3), options=ChipOptions(input_bits=12, adc_bits=20, adc_rows=16))
    calibrate_adc(fine, [x])
    torch.testing.assert_close(fine(x), ideal(x), rtol=1e-3, atol=1e-3)
    coarse = convert_mlc(tiny, mlc_hw(3), options=ChipOptions(adc_bits=3, adc_rows=16))
    with pytest.raises(RuntimeError, match="calibrate_adc"):
        coarse(x)
    calibrate_adc(coarse, [x])
    assert not torch.allclose(coarse(x), ideal(x), atol=1e-3)
    noisy = convert_mlc(tiny, mlc_hw(3), options=ChipOptions(read_noise=0.05), chip=3)
    first, second = noisy(x), noisy(x)
    assert not torch.allclose(first, second)  # every read is different
    for layer in mlc_layers(noisy).values():
        layer.program(0, 3)
    torch.testing.assert_close(noisy(x), first)  # but reproducible per chip


def test_read_noise_draws_on_the_cells_current_device(tiny, device):
    """Programmed on the CPU, then moved: the read-noise stream is made on the cells' device at the
    first read (a generator bound at conversion would fail there), and repeats per programming."""
    x = torch.randn(4, 1, 8, 8)
    noisy = convert_mlc(tiny, mlc_hw(3), options=ChipOptions(read_noise=0.05), chip=3)
    on_cpu = noisy(x)
    noisy.to(device)
    for layer in mlc_layers(noisy).values():
        layer.program(0, 3)
    first = noisy(x.to(device))
    assert all(layer.read_generator.device.type == device.type for layer in mlc_layers(noisy).values())
    assert not torch.allclose(first, noisy(x.to(device)))
    for layer in mlc_layers(noisy).values():
        layer.program(0, 3)
    torch.testing.assert_close(noisy(x.to(device)), first)
    if device.type == "cpu":
        torch.testing.assert_close(first, on_cpu)
    noisy.to(torch.float64)  # a new dtype keeps the generator and still reads
    assert torch.isfinite(noisy(x.to(device, torch.float64))).all()


def test_vat_noise_is_drawn_on_the_weights_device(device):
    hw = mlc_hw(3, "state_dependent", 0.3)
    weight = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    generator = torch.Generator(device=device).manual_seed(1)
    noisy = noisy_weight(weight, hw, generator)
    assert noisy.device == weight.device
    again = noisy_weight(weight, hw, torch.Generator(device=device).manual_seed(1))
    assert torch.equal(noisy, again)  # the device stream is reproducible
    assert not torch.equal(noisy, noisy_weight(weight, hw, generator))  # and moves on per step
    noisy.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones_like(weight))


def test_variation_aware_training_runs_on_the_device(tiny, device):
    """VAT draws its noise with a generator on the training device, every step; same seed, same model."""
    from torch.utils.data import DataLoader, TensorDataset

    from nipa.pipelines.finetune import train_vat

    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,)))
    settings = FinetuneSettings(vat_epochs=1, vat_batch_size=16)
    hw = mlc_hw(3, "state_dependent", 0.2)

    def train() -> nn.Module:
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        return train_vat(tiny, hw, ["conv1", "fc"], loader, settings, 0, device, log=lambda line: None)

    first, second = train(), train()
    assert first.fc.weight.device.type == device.type
    assert not torch.equal(first.fc.weight.cpu(), tiny.fc.weight)  # it trained
    torch.testing.assert_close(first.fc.weight, second.fc.weight)


def test_adc_codes_are_clamped_to_the_converter_range():
    """Inputs beyond the calibrated range saturate the ADC at its codes -2^(b-1) .. 2^(b-1) - 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 6)).eval()
    bits = 4
    chip = convert_mlc(net, mlc_hw(3), options=ChipOptions(adc_bits=bits, adc_rows=16))  # one ADC read per output
    x = torch.randn(32, 16)
    calibrate_adc(chip, [x])
    layer = next(iter(mlc_layers(chip).values()))
    half = 2 ** (bits - 1)
    step = layer.adc_scale / half
    with torch.no_grad():
        codes = (chip(5 * x) - layer.bias) / (layer.weight_scale * layer.col_gain) / step
        unclamped = (convert_mlc(net, mlc_hw(3))(5 * x) - layer.bias) / layer.weight_scale / step
    assert unclamped.max() > half and unclamped.min() < -half  # the ideal chip leaves the range ...
    assert codes.max() == pytest.approx(half - 1) and codes.min() == pytest.approx(-half)  # ... the ADC does not


def test_reprogram_chip_sums_layers(tiny):
    chip = convert_mlc(tiny, mlc_hw(3, "state_dependent", 0.2))
    set_trainable(chip, "cells")
    with torch.no_grad():
        chip.fc.shadow[0, :3] += 1.0
    written = reprogram_chip(chip)
    assert written == chip_writes(chip) >= 3


def test_finetune_script_end_to_end_on_digits(digits_ckpt_dir, tmp_path):
    import finetune

    out = tmp_path / "digits_finetune.jsonl"
    # One step per epoch (64 images, batch 512) with a cell learning rate that crosses rounding boundaries,
    # so that mode cells does write cells in its one cell epoch.
    argv = ["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--cellbit", "2", "--vari", "0.5",
            "--chips", "2", "--calib_samples", "64", "--epochs", "2", "--cell_epochs", "1",
            "--reprogram_every", "1", "--cell_lr", "0.5", "--vat_epochs", "1", "--batch_size", "512", "--out", str(out),
            "--device", "cpu"]
    assert finetune.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * len(METHODS)
    assert {r["method"] for r in records} == set(METHODS)
    by = {(r["spread"], r["method"], r["chip"]): r for r in records}
    for (spread, method, chip), record in by.items():
        assert record["acc_chip"] == by[(spread, "none", chip)]["top1"]  # the same chips for every method
        assert record["calib_samples"] == {"none": 0, "vat": 1437, "vat_bn": 1437}.get(method, 64)
        assert (record["writes"] > 0) == (method == "proposed_cells")  # only the cells mode re-programs
        assert record["hw"]["wl_weight"] == 3 and record["samples"] == 360
    assert out.with_suffix(".csv").is_file() and out.with_suffix(".png").is_file()
    # A rerun finds every record done and only rewrites the summary.
    assert finetune.main(argv) == 0
    assert len(out.read_text().splitlines()) == len(records)
