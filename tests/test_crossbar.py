"""The bit-and-crossbar slicing simulator (SPEC section 4) against the fake-quantized layer, against the
naive per-(tile, bit, slice) loop of `nipa.simulator.reference`, and its device-error and ADC behaviour."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import get_model
from nipa.hardware.config import HWConfig
from nipa.hardware.device_errors import leak_level, perturb_conductance
from nipa.hardware.quant import fake_quantize_input, fake_quantize_weight, slice_magnitude
from nipa.simulator.crossbar import (
    CrossbarConv2d,
    CrossbarCore,
    CrossbarLinear,
    calibrate_adc,
    convert,
    crossbar_cores,
    mapped_layer_names,
    program_chip,
)
from nipa.simulator.reference import NaiveCrossbarCore, compare_layerwise, naive_convert, pair_conductances

IDEAL_ADC = 24  # enough bits that the dynamic ADC is exact to float rounding


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def fake_quantized(layer: nn.Module, x: torch.Tensor, hw: HWConfig) -> torch.Tensor:
    """The plain fake-quantized layer: per-(channel, tile) weights, per-tensor input."""
    weight = fake_quantize_weight(layer.weight.detach(), hw.wl_weight, hw.subArray)
    x = fake_quantize_input(x, hw.wl_input)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)


def snap_cells(model: nn.Module, fraction_bits: int = 10) -> None:
    """Round programmed pair conductances to a dyadic grid so that every partial sum is exact in
    float32 whatever the summation order: the fast and the naive simulator then see bit-identical
    ADC inputs and cannot land on different sides of a rounding boundary. Each cell still has its own
    random error, so a mix-up of cells would still show."""
    for core in crossbar_cores(model):
        core.conductance = torch.round(core.conductance * 2**fraction_bits) / 2**fraction_bits


def small_net_seeded(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return small_net()


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # fan-in 27
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False),  # fan-in 72
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),  # fan-in 96
        nn.ReLU(),
        nn.Linear(12, 5),  # fan-in 12
    )


# ---- ideal ADC, ideal cells == fake quantization -----------------------------------------------


@pytest.mark.parametrize("cell_bits", [1, 2, 3])
@pytest.mark.parametrize(
    ("fan_in", "rows", "bias"),
    [(20, 32, True), (64, 64, False), (100, 32, True), (96, 32, False), (7, 4, True)],
)
def test_linear_ideal_equals_fake_quantized(fan_in: int, rows: int, bias: bool, cell_bits: int) -> None:
    torch.manual_seed(fan_in + rows + cell_bits)
    hw = HWConfig(wl_weight=8, subArray=rows, ADCprecision=IDEAL_ADC, cellBit=cell_bits)
    layer = nn.Linear(fan_in, 9, bias=bias)
    x = torch.randn(3, 5, fan_in)  # leading dimensions are kept
    crossbar = convert(layer, hw)
    assert isinstance(crossbar, CrossbarLinear)
    with torch.no_grad():
        y = crossbar(x)
        expected = fake_quantized(layer, x, hw)
    assert y.shape == expected.shape
    assert rel_err(y, expected) < 1e-5
    # ... and it is not simply the float layer: quantization is really applied.
    assert rel_err(y, layer(x).detach()) > 1e-4


CONVS = [
    lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),
    lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2),
    lambda: nn.Conv2d(2, 3, 4, padding="same"),  # even kernel: asymmetric padding
    lambda: nn.Conv2d(4, 6, 1, stride=2, bias=False),  # ResNet shortcut: im2col skips pixels
    lambda: nn.Conv2d(16, 8, 3, padding=1),  # fan-in 144 > 128 rows, not a multiple
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("cell_bits", [1, 2, 3])
@pytest.mark.parametrize("make", CONVS)
def test_conv_ideal_equals_fake_quantized(make, cell_bits: int) -> None:
    torch.manual_seed(cell_bits)
    conv = make()
    hw = HWConfig(wl_weight=7, subArray=16 if conv.in_channels < 16 else 128, ADCprecision=IDEAL_ADC,
                  cellBit=cell_bits)
    x = torch.randn(2, conv.in_channels, 9, 9)
    crossbar = convert(conv, hw)
    assert isinstance(crossbar, CrossbarConv2d)
    with torch.no_grad():
        y = crossbar(x)
        expected = fake_quantized(conv, x, hw)
    assert y.shape == expected.shape
    assert rel_err(y, expected) < 1e-5


def test_sequential_with_excluded_layers_equals_fake_quantized() -> None:
    torch.manual_seed(0)
    net = small_net()
    hw = HWConfig(wl_weight=6, subArray=32, ADCprecision=IDEAL_ADC, cellBit=1)
    converted = convert(net, hw, exclude=["2", "5"])
    assert mapped_layer_names(converted) == ["0", "7"]
    assert type(converted[2]) is nn.Conv2d and type(converted[5]) is nn.Linear  # stay digital
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        h = F.relu(fake_quantized(net[0], x, hw))
        h = torch.flatten(F.relu(net[2](h)), 1)
        expected = fake_quantized(net[7], F.relu(net[5](h)), hw)
        assert rel_err(converted(x), expected) < 1e-5


# ---- slicing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "cell_bits"), [(4, 1), (4, 3), (6, 1), (6, 2), (8, 1), (8, 2), (8, 3),
                                                 (9, 2), (9, 4), (5, 4)])
def test_slices_reconstruct_integer_weights(bits: int, cell_bits: int) -> None:
    levels = 2 ** (bits - 1) - 1
    q = torch.arange(-levels, levels + 1, dtype=torch.float32)  # every representable value
    slices = slice_magnitude(q, bits, cell_bits)
    assert slices.shape[0] == math.ceil((bits - 1) / cell_bits)
    significance = torch.tensor([2.0 ** (cell_bits * k) for k in range(slices.shape[0])])
    assert torch.equal((significance[:, None] * slices).sum(0), q)
    assert slices.abs().max() <= 2**cell_bits - 1
    assert torch.all(slices * torch.sign(q) >= 0)  # each slice carries the weight's sign


def test_core_slices_and_scales_reconstruct_fake_quantized_weight() -> None:
    torch.manual_seed(1)
    weight = torch.randn(7, 50)
    hw = HWConfig(wl_weight=7, subArray=16, cellBit=2)
    core = CrossbarCore(weight, hw)
    assert core.slices.shape == (3, 7, 4, 16)
    significance = torch.tensor([1.0, 4.0, 16.0]).view(3, 1, 1, 1)
    q = (core.slices * significance).sum(0)  # [out, T, rows]
    assert torch.equal(q, torch.round(q)) and q.abs().max() <= 2 ** (hw.wl_weight - 1) - 1
    rebuilt = (q * core.weight_scale[:, :, None]).reshape(7, -1)[:, :50]
    assert torch.allclose(rebuilt, fake_quantize_weight(weight, 7, 16), rtol=0, atol=1e-6)
    # Without device error the programmed pairs are the slices themselves.
    assert torch.equal(pair_conductances(core), core.slices)


# ---- fast simulator == naive loop ---------------------------------------------------------------


def fast_and_naive(net: nn.Module, hw: HWConfig, x: torch.Tensor, snap: bool = False, **kwargs):
    """The fast and the naive simulator of the same chip, ready to run (calibrated where needed)."""
    fast = convert(net, hw, **kwargs).eval()
    naive = naive_convert(net, hw, **kwargs).eval()
    assert all(isinstance(c, NaiveCrossbarCore) for c in crossbar_cores(naive))
    assert not any(isinstance(c, NaiveCrossbarCore) for c in crossbar_cores(fast))
    if snap:
        snap_cells(fast)
        snap_cells(naive)
    if hw.adc_mode == "calibrated":
        calibrate_adc(fast, [x[: len(x) // 2], x[len(x) // 2:]])
        calibrate_adc(naive, [x[: len(x) // 2], x[len(x) // 2:]])
        for a, b in zip(crossbar_cores(fast), crossbar_cores(naive), strict=True):
            assert not torch.isnan(a.adc_range).any()
            assert torch.allclose(a.adc_range, b.adc_range, rtol=1e-6, atol=1e-5)
            b.adc_range = a.adc_range.clone()  # the very same range, so only the reads are compared
    return fast, naive


def layerwise_rel_err(reference: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    """The largest per-layer relative difference, every layer fed the same input (see
    `nipa.simulator.reference.compare_layerwise`)."""
    per_layer = compare_layerwise(reference, other, x)
    assert len(per_layer) == len(crossbar_cores(reference)) > 0
    return max(per_layer.values())


@pytest.mark.parametrize("mode", ["dynamic", "calibrated", "full"])
@pytest.mark.parametrize(("adc_bits", "cell_bits"), [(4, 1), (5, 2), (6, 3)])
def test_fast_equals_naive_low_adc(mode: str, adc_bits: int, cell_bits: int) -> None:
    net = small_net_seeded(adc_bits)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=adc_bits, cellBit=cell_bits, adc_mode=mode)
    x = torch.randn(6, 3, 8, 8)
    fast, naive = fast_and_naive(net, hw, x)
    assert layerwise_rel_err(fast, naive, x) < 1e-5
    # The ADC really quantizes: the result is not the ideal one.
    ideal = convert(net, dataclasses.replace(hw, ADCprecision=IDEAL_ADC, adc_mode="dynamic"))
    assert rel_err(outputs(fast, x), outputs(ideal, x)) > 1e-3


DEVICE_ERRORS = [
    {"vari_type": "state_dependent", "vari": 0.1},
    {"vari_type": "state_independent", "ind_vari": 0.05},
    {"vari_type": "laplace", "laplace_b": 0.12},
    {"vari_type": "state_dependent", "SAF_prop": 0.02},
    {"vari_type": "state_dependent", "vari": 0.2, "SAF_prop": 0.01, "onoffratio": 5.0},
]


@pytest.mark.parametrize(
    ("errors", "mode"),
    [(errors, "dynamic") for errors in DEVICE_ERRORS]
    + [(errors, mode) for errors in (DEVICE_ERRORS[0], DEVICE_ERRORS[4]) for mode in ("calibrated", "full")],
)
def test_fast_equals_naive_with_device_errors(errors: dict, mode: str) -> None:
    net = small_net_seeded(7)
    hw = HWConfig(wl_weight=6, subArray=32, ADCprecision=5, cellBit=1, adc_mode=mode, **errors)
    x = torch.randn(6, 3, 8, 8)
    fast, naive = fast_and_naive(net, hw, x, snap=True, seed=3, chip=2)
    assert layerwise_rel_err(fast, naive, x) < 1e-5
    # Device errors are really there: another chip reads differently.
    other = convert(net, hw, seed=3, chip=5).eval()
    snap_cells(other)
    if mode == "calibrated":
        calibrate_adc(other, [x])
    assert rel_err(outputs(other, x), outputs(fast, x)) > 1e-4


def test_fast_equals_naive_unsnapped_device_error() -> None:
    """Raw (unsnapped) cells: equal up to float rounding of the partial sums (a rare ADC level flip
    at a rounding boundary would show here as a larger error)."""
    net = small_net_seeded(11)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=5, vari=0.1)
    x = torch.randn(4, 3, 8, 8)
    fast, naive = fast_and_naive(net, hw, x, seed=1)
    # The products sum in another order (the thread count changes it too), so a partial sum that lies
    # within float rounding of an ADC rounding boundary may read one level apart: allow a few such
    # flips, no more.
    outputs = {}

    def recorder(name):
        return lambda _m, args, out: outputs.__setitem__(name, (args[0], out))

    hooks = [m.register_forward_hook(recorder(name)) for name, m in fast.named_modules()
             if isinstance(m, (CrossbarLinear, CrossbarConv2d))]
    with torch.no_grad():
        fast(x)
    for hook in hooks:
        hook.remove()
    naive_layers = dict(naive.named_modules())
    for name, (layer_in, expected) in outputs.items():
        with torch.no_grad():
            got = naive_layers[name](layer_in)
        far = (got - expected).abs() > 1e-4 * expected.abs().max()
        assert far.float().mean() < 0.01, name


def test_smallcnn_fast_equals_naive() -> None:
    net = get_model("smallcnn", in_channels=1, num_classes=10)
    hw = HWConfig(wl_weight=6, subArray=128, ADCprecision=5, vari=0.1)
    x = torch.randn(2, 1, 28, 28)
    fast, naive = fast_and_naive(net, hw, x, snap=True, seed=0)
    assert layerwise_rel_err(fast, naive, x) < 1e-5


@pytest.mark.parametrize(
    ("mode", "errors"),
    [("dynamic", {}), ("calibrated", {}), ("full", {}), ("dynamic", {"vari": 0.1, "SAF_prop": 0.01})],
)
def test_chunked_rows_equal_unchunked(mode: str, errors: dict) -> None:
    net = small_net_seeded(5)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=4, cellBit=1, adc_mode=mode, **errors)
    x = torch.randn(6, 3, 8, 8)
    # 0.01 MB ~ 2600 floats: every layer's batch rows are split (the two-pass path of the dynamic ADC).
    chunked, naive = fast_and_naive(net, hw, x, snap=True, memory_mb=0.01)
    whole, _ = fast_and_naive(net, hw, x, snap=True)
    assert crossbar_cores(chunked)[0]._chunking(6 * 64)[2] < 6 * 64  # rows really chunked
    if mode == "calibrated":  # the same ranges (calibrated once each, with and without chunking)
        for a, b in zip(crossbar_cores(whole), crossbar_cores(chunked), strict=True):
            assert torch.allclose(a.adc_range, b.adc_range, rtol=1e-6, atol=1e-5)
            b.adc_range = a.adc_range.clone()
    assert layerwise_rel_err(whole, chunked, x) < 1e-5
    assert layerwise_rel_err(chunked, naive, x) < 1e-5


# ---- the ADC ------------------------------------------------------------------------------------


def grid_check(read: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, levels: int) -> None:
    index = (read - lo) / step
    assert torch.allclose(index, torch.round(index), atol=1e-3)
    assert index.min() >= -1e-3 and index.max() <= levels + 1e-3


@pytest.mark.parametrize("mode", ["dynamic", "dynamic_tile"])
@pytest.mark.parametrize("adc_bits", [3, 5, 8])
def test_adc_dynamic_error_within_half_step(adc_bits: int, mode: str) -> None:
    torch.manual_seed(adc_bits)
    core = CrossbarCore(torch.randn(6, 40), HWConfig(subArray=16, ADCprecision=adc_bits, cellBit=2,
                                                     adc_mode=mode))
    partial = torch.randn(3, 7, 10, core.num_slices, 6) * 20  # [t, z, n, K, out]
    partial[:, 0, :, 0, :] = 4.0  # a constant read (zero range) passes through unchanged
    partial[1] *= 3  # tile 1 spans a wider range than the others
    read = core._adc(partial.clone())
    # dynamic: one range per (input bit, slice) over every tile, row and column (SPEC section 4,
    # step 6); dynamic_tile: one per (tile, input bit, slice).
    dims = (0, 2, 4) if mode == "dynamic" else (2, 4)
    lo = partial.amin(dim=dims, keepdim=True)
    hi = partial.amax(dim=dims, keepdim=True)
    step = (hi - lo) / 2**adc_bits
    assert torch.all((read - partial).abs() <= step / 2 + 1e-4)
    assert torch.equal(read[:, 0, :, 0, :], partial[:, 0, :, 0, :])
    grid_check(read[:, 1:], lo[:, 1:], step[:, 1:], 2**adc_bits)
    assert (read - partial).abs().max() > 0.05 * step.max()  # it does quantize
    # The shared range is the wide tile's: the narrow tiles read with its (coarser) step.
    if mode == "dynamic":
        assert torch.all(step[0, 1:] == ((partial[:, 1:].amax(dim=(0, 2, 4)) - partial[:, 1:].amin(dim=(0, 2, 4)))
                                         / 2**adc_bits).unsqueeze(1).unsqueeze(-1))


@pytest.mark.parametrize("adc_bits", [3, 5, 8])
def test_adc_calibrated_error_within_half_step(adc_bits: int) -> None:
    torch.manual_seed(adc_bits)
    core = CrossbarCore(torch.randn(6, 40), HWConfig(subArray=16, ADCprecision=adc_bits, cellBit=1,
                                                     adc_mode="calibrated"))
    k = core.num_slices
    lo = -torch.rand(k) * 10 - 1
    hi = torch.rand(k) * 10 + 1
    core.adc_range = torch.stack([lo, hi], 1)
    core.calibrated = True
    partial = lo.view(1, 1, 1, k, 1) + torch.rand(2, 7, 10, k, 6) * (hi - lo).view(1, 1, 1, k, 1)
    read = core._adc(partial.clone())
    step = ((hi - lo) / 2**adc_bits).view(1, 1, 1, k, 1)
    assert torch.all((read - partial).abs() <= step / 2 + 1e-4)
    grid_check(read, lo.view(1, 1, 1, k, 1), step, 2**adc_bits)
    # Out of range: clamped to the range ends.
    outside = torch.stack([lo - 5, hi + 5]).view(1, 1, 2, k, 1)
    clamped = core._adc(outside.clone())
    assert torch.allclose(clamped[0, 0, 0, :, 0], lo) and torch.allclose(clamped[0, 0, 1, :, 0], hi)


@pytest.mark.parametrize(("adc_bits", "cell_bits"), [(4, 1), (6, 2), (8, 1)])
def test_adc_full_scale_error_within_half_step(adc_bits: int, cell_bits: int) -> None:
    rows = 32
    core = CrossbarCore(torch.randn(6, 40), HWConfig(subArray=rows, ADCprecision=adc_bits, cellBit=cell_bits,
                                                     adc_mode="full"))
    full = rows * (2**cell_bits - 1)
    partial = (torch.rand(2, 7, 10, core.num_slices, 6) * 2 - 1) * full
    read = core._adc(partial.clone())
    step = 2 * full / 2**adc_bits
    assert torch.all((read - partial).abs() <= step / 2 + 1e-4)
    grid_check(read, torch.tensor(-float(full)), torch.tensor(step), 2**adc_bits)


def test_adc_full_scale_exact_when_step_is_one_level() -> None:
    """Without device error partial sums are integers; a full-scale ADC with 2^a >= 2 S (2^c - 1)
    levels has step <= 1 and reads them exactly."""
    net = small_net_seeded(2)
    x = torch.randn(4, 3, 8, 8)
    ideal = outputs(convert(net, HWConfig(subArray=32, ADCprecision=IDEAL_ADC)), x)
    exact = outputs(convert(net, HWConfig(subArray=32, ADCprecision=6, adc_mode="full")), x)
    coarse = outputs(convert(net, HWConfig(subArray=32, ADCprecision=5, adc_mode="full")), x)
    assert rel_err(exact, ideal) < 1e-5
    assert rel_err(coarse, ideal) > 1e-3


@pytest.mark.parametrize("mode", ["dynamic", "calibrated", "full"])
def test_more_adc_bits_less_error(mode: str) -> None:
    net = small_net_seeded(2)
    x = torch.randn(8, 3, 8, 8)
    ideal = convert(net, HWConfig(subArray=32, ADCprecision=IDEAL_ADC))
    errors = []
    # full scale +-32 here: 6 bits already give step 1, exact for integer partial sums, and 4 bits
    # (step 4) read the small partial sums of this net as 0 just as 3 bits do
    for adc_bits in ((4, 5, 6) if mode == "full" else (3, 6, 10)):
        model = convert(net, HWConfig(subArray=32, ADCprecision=adc_bits, adc_mode=mode))
        if mode == "calibrated":
            calibrate_adc(model, [x])
        with torch.no_grad():
            errors.append(rel_err(model(x), ideal(x)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 0.01


# ---- device error statistics --------------------------------------------------------------------


def test_perturb_state_dependent_statistics() -> None:
    hw = HWConfig(cellBit=2, vari=0.1)
    g = torch.tensor([0.5, 1.0, 2.0, 3.0]).repeat(100_000)
    out = perturb_conductance(g, hw, torch.Generator().manual_seed(0))
    relative = (out - g) / g
    n = relative.numel()
    assert abs(relative.mean().item()) < 4 * 0.1 / math.sqrt(n)
    assert relative.std().item() == pytest.approx(0.1, rel=0.02)
    for level in (0.5, 3.0):  # relative spread is the same at every level
        assert relative[g == level].std().item() == pytest.approx(0.1, rel=0.02)


def test_perturb_state_independent_statistics() -> None:
    hw = HWConfig(vari_type="state_independent", ind_vari=0.05)
    g = torch.tensor([0.0, 1.0]).repeat(200_000)
    out = perturb_conductance(g, hw, torch.Generator().manual_seed(1))
    error = out - g
    assert abs(error.mean().item()) < 4 * 0.05 / math.sqrt(error.numel())
    for level in (0.0, 1.0):  # additive: same absolute spread at every level
        assert error[g == level].std().item() == pytest.approx(0.05, rel=0.02)


def test_perturb_laplace_statistics() -> None:
    b = 0.12
    hw = HWConfig(vari_type="laplace", laplace_b=b)
    g = torch.full((400_000,), 2.0)
    relative = (perturb_conductance(g, hw, torch.Generator().manual_seed(2)) - g) / g
    n = relative.numel()
    assert abs(relative.mean().item()) < 4 * math.sqrt(2) * b / math.sqrt(n)
    assert relative.var().item() == pytest.approx(2 * b**2, rel=0.03)
    assert relative.abs().mean().item() == pytest.approx(b, rel=0.02)  # Laplace: E|X| = b
    assert relative.median().abs().item() < 0.01 * b


@pytest.mark.parametrize("p", [0.01, 0.05])
def test_perturb_stuck_at_fractions(p: float) -> None:
    hw = HWConfig(cellBit=2, SAF_prop=p, onoffratio=10.0)
    g_min = leak_level(2, 10.0)
    g_max = 3 + g_min
    g = torch.tensor([1.0, 2.0]).repeat(200_000)  # no cell starts at G_min or G_max
    out = perturb_conductance(g, hw, torch.Generator().manual_seed(3))
    n = g.numel()
    tolerance = 4 * math.sqrt(p * (1 - p) / n)
    assert abs((out == g_min).float().mean().item() - p) < tolerance
    assert abs((out == g_max).float().mean().item() - p) < tolerance
    assert torch.equal(out[(out != g_min) & (out != g_max)], g[(out != g_min) & (out != g_max)])


def program_large_core(hw: HWConfig, seed: int = 0) -> CrossbarCore:
    torch.manual_seed(seed)
    core = CrossbarCore(torch.randn(256, 1024), hw, name="big")
    core.program(seed=seed, chip=0)
    return core


@pytest.mark.parametrize(("cell_bits", "onoffratio"), [(1, 1e8), (2, 1e8), (1, 5.0)])
def test_programmed_pairs_state_dependent(cell_bits: int, onoffratio: float) -> None:
    vari = 0.1
    hw = HWConfig(wl_weight=7, cellBit=cell_bits, vari=vari, onoffratio=onoffratio)
    core = program_large_core(hw)
    slices, error = core.slices, pair_conductances(core) - core.slices
    g0 = leak_level(cell_bits, onoffratio)
    for level in range(2**cell_bits):
        cells = error[slices.abs() == level]
        assert cells.numel() > 10_000
        # one cell at level + g0, the other at g0, each with relative N(0, vari) error
        expected = math.sqrt(((level + g0) ** 2 + g0**2) * vari**2)
        if expected < 1e-6:
            assert cells.abs().max() < 1e-6
        else:
            assert cells.std().item() == pytest.approx(expected, rel=0.03)
            assert abs(cells.mean().item()) < 4 * expected / math.sqrt(cells.numel())


def test_programmed_pairs_state_independent() -> None:
    ind_vari = 0.05
    core = program_large_core(HWConfig(wl_weight=5, vari_type="state_independent", ind_vari=ind_vari))
    error = pair_conductances(core) - core.slices
    assert error.var().item() == pytest.approx(2 * ind_vari**2, rel=0.02)
    assert error[core.slices == 0].var().item() == pytest.approx(2 * ind_vari**2, rel=0.03)


def test_programmed_pairs_laplace() -> None:
    b = 0.1
    core = program_large_core(HWConfig(wl_weight=5, vari_type="laplace", laplace_b=b))
    error = pair_conductances(core) - core.slices
    on = error[core.slices.abs() == 1]
    assert on.var().item() == pytest.approx(2 * b**2, rel=0.05)
    assert error[core.slices == 0].abs().max() < 1e-6


def test_programmed_pairs_stuck_at() -> None:
    p = 0.05
    hw = HWConfig(wl_weight=5, cellBit=1, SAF_prop=p)
    core = program_large_core(hw)
    pairs, slices = pair_conductances(core), core.slices
    # cellBit 1 pair reads: a zero weight reads +-1 when one of its two cells sticks at G_max.
    # (SA0 of a cell at level 0 changes nothing, SA1 of a cell at level 1 neither.)
    zero = pairs[slices == 0]
    flipped = (zero.abs() > 0.5).float().mean().item()
    expected = 2 * p * (1 - p)  # exactly one of the two cells SA1
    assert abs(flipped - expected) < 4 * math.sqrt(expected * (1 - expected) / zero.numel())
    # a weight +1 reads 0 when its positive cell is SA0 or its negative cell SA1, not both
    one = pairs[slices == 1]
    lost = (one.abs() < 0.5).float().mean().item()
    assert abs(lost - expected) < 4 * math.sqrt(expected * (1 - expected) / one.numel())
    assert ((one + 1).abs() < 1e-6).float().mean().item() == pytest.approx(p * p, abs=4 * math.sqrt(
        p * p / one.numel()))  # both: reads -1


# ---- chips --------------------------------------------------------------------------------------


CHIP_HW = HWConfig(wl_weight=6, subArray=32, ADCprecision=6, vari=0.2, SAF_prop=0.01)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_same_seed_same_chip_and_reprogramming() -> None:
    net = small_net_seeded(3)
    x = torch.randn(4, 3, 8, 8)
    chip0 = outputs(convert(net, CHIP_HW, seed=1, chip=0), x)
    assert torch.equal(outputs(convert(net, CHIP_HW, seed=1, chip=0), x), chip0)
    model = convert(net, CHIP_HW, seed=1, chip=1)
    chip1 = outputs(model, x)
    assert rel_err(chip1, chip0) > 1e-3
    assert rel_err(outputs(convert(net, CHIP_HW, seed=2, chip=0), x), chip0) > 1e-3
    program_chip(model, seed=1, chip=0)
    assert torch.equal(outputs(model, x), chip0)
    program_chip(model, seed=1, chip=1)
    assert torch.equal(outputs(model, x), chip1)


def test_per_chip_is_fixed_per_read_is_not() -> None:
    net = small_net_seeded(4)
    x = torch.randn(4, 3, 8, 8)
    fixed = convert(net, CHIP_HW, seed=1)
    assert torch.equal(outputs(fixed, x), outputs(fixed, x))
    per_read = convert(net, CHIP_HW, seed=1, per_read=True)
    first, second = outputs(per_read, x), outputs(per_read, x)
    assert rel_err(first, second) > 1e-3
    with pytest.raises(NotImplementedError):
        naive_convert(net, CHIP_HW, per_read=True)


# ---- on/off ratio -------------------------------------------------------------------------------


def test_leak_increases_error_under_state_dependent_variation() -> None:
    net = small_net_seeded(6)
    x = torch.randn(8, 3, 8, 8)
    base = dict(wl_weight=6, subArray=32, ADCprecision=IDEAL_ADC, cellBit=1)
    ideal = outputs(convert(net, HWConfig(**base)), x)
    errors = {}
    for ratio in (2.0, 5.0, 1e8):
        hw = HWConfig(**base, vari=0.1, onoffratio=ratio)
        errors[ratio] = rel_err(outputs(convert(net, hw, seed=9), x), ideal)
    assert errors[2.0] > errors[5.0] > errors[1e8] > 0


def test_leak_cancels_in_the_differential_pair() -> None:
    """Both cells of a pair carry the leak g0 = (2^c - 1)/(R - 1) (3 at R = 2 for 2-bit cells): their
    difference reads the slice. A tiny variation (1e-5) makes the simulator program the real cells,
    leak included, so a leak missing from one cell would show as an error of g0 per weight."""
    net = small_net_seeded(6)
    x = torch.randn(8, 3, 8, 8)
    base = dict(wl_weight=6, subArray=32, ADCprecision=5, cellBit=2, vari=1e-5)
    low_ratio = convert(net, HWConfig(**base, onoffratio=2.0))
    high_ratio = convert(net, HWConfig(**base, onoffratio=1e8))
    for core in crossbar_cores(low_ratio):
        ideal = core._as_columns(core.slices)
        assert not torch.equal(core.conductance, ideal)  # the cells were really programmed
        assert (core.conductance - ideal).abs().max() < 1e-3
    assert rel_err(outputs(low_ratio, x), outputs(high_ratio, x)) < 1e-3


# ---- calibration and batch size -----------------------------------------------------------------


def test_calibrated_without_calibration_raises() -> None:
    hw = HWConfig(subArray=32, adc_mode="calibrated")
    for make in (convert, naive_convert):
        model = make(small_net_seeded(0), hw)
        with pytest.raises(RuntimeError, match="calibrate"):
            outputs(model, torch.randn(2, 3, 8, 8))


def batch_with_fixed_max(n: int) -> torch.Tensor:
    """Inputs whose halves share the per-tensor max |x|, so that the input scale does not depend on
    how the batch is split and only the ADC range can."""
    x = torch.randn(n, 3, 8, 8).clamp(-2.5, 2.5)
    x[0, 0, 0, 0] = 3.0
    x[n // 2, 0, 0, 0] = 3.0
    return x


# One layer: deeper in a network the per-tensor input scale of a later layer depends on the batch
# as well (a known property of per-tensor input quantization, in every ADC mode).
def one_layer() -> nn.Conv2d:
    torch.manual_seed(8)
    return nn.Conv2d(3, 8, 3, padding=1)


@pytest.mark.parametrize("mode", ["calibrated", "full"])
def test_batch_size_does_not_change_calibrated_or_full(mode: str) -> None:
    torch.manual_seed(0)
    x = batch_with_fixed_max(16)
    model = convert(one_layer(), HWConfig(subArray=16, ADCprecision=4, adc_mode=mode, vari=0.1))
    snap_cells(model)  # exact partial sums: the batch split cannot move a read across a level
    if mode == "calibrated":
        calibrate_adc(model, [x])
    whole = outputs(model, x)
    halves = torch.cat([outputs(model, x[:8]), outputs(model, x[8:])])
    assert rel_err(halves, whole) < 1e-5


def test_batch_size_changes_dynamic() -> None:
    """Known behaviour of the original's dynamic ADC: the range of a read spans the whole batch, so
    one sample's result depends on the other samples it is evaluated with."""
    torch.manual_seed(0)
    x = batch_with_fixed_max(16)
    model = convert(one_layer(), HWConfig(subArray=16, ADCprecision=4, adc_mode="dynamic", vari=0.1))
    snap_cells(model)
    whole = outputs(model, x)
    halves = torch.cat([outputs(model, x[:8]), outputs(model, x[8:])])
    assert rel_err(halves, whole) > 1e-3


# ---- the input model and layer selection --------------------------------------------------------


def test_convert_leaves_original_untouched() -> None:
    net = small_net_seeded(1)
    before = copy.deepcopy(net.state_dict())
    types = [type(m) for m in net.modules()]
    x = torch.randn(2, 3, 8, 8)
    reference = outputs(net, x)
    for make in (convert, naive_convert):
        converted = make(net, HWConfig(subArray=32, vari=0.1))
        outputs(converted, x)
        assert mapped_layer_names(converted) == ["0", "2", "5", "7"]
    assert [type(m) for m in net.modules()] == types
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(net, x), reference)


def test_layer_patterns() -> None:
    net = small_net_seeded(1)
    with pytest.raises(ValueError, match="no_such_layer"):
        convert(net, HWConfig(), exclude=["no_such_layer"])
    with pytest.raises(ValueError):
        convert(net, HWConfig(), include=["nothing*"])
    assert mapped_layer_names(convert(net, HWConfig(), include=["[02]"])) == ["0", "2"]


# ---- convolution inputs quantized before im2col ------------------------------------------------


@pytest.mark.parametrize("lookup", ["1", "0"])
@pytest.mark.parametrize(("wl_input", "structure", "shape"),
                         [(8, "fast", "square"), (9, "fast", "square"), (8, "naive", "square"),
                          (8, "original", "square"), (8, "fast", "dilated")])
def test_conv_levels_before_im2col_equal_quantized_rows(lookup: str, wl_input: int, structure: str, shape: str,
                                                        monkeypatch) -> None:
    """A convolution quantizes its input before im2col and hands its core integer levels: the result is
    bit-identical to the core quantizing the float im2col rows itself (padding, stride 2, a non-square
    dilated kernel, 9-bit inputs in int16, the lookup kernel and the batched products, the naive loop and
    the original's structure)."""
    from nipa.hardware.quant import input_scale
    from nipa.simulator.crossbar import im2col

    monkeypatch.setenv("NIPA_LOOKUP", lookup)
    torch.manual_seed(0)
    layer = (nn.Conv2d(5, 7, 3, stride=2, padding=1) if shape == "square"
             else nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)))
    hw = HWConfig(wl_weight=6, wl_input=wl_input, subArray=32, ADCprecision=5, cellBit=2, vari=0.1)
    model = nn.Sequential(layer)
    converted = (convert(model, hw, seed=2) if structure == "fast"
                 else naive_convert(model, hw, seed=2, structure=structure)).eval()
    x = torch.relu(torch.randn(6, 5, 11, 11)) - 0.2  # signed, with zeros
    conv = converted[0]
    assert isinstance(conv, CrossbarConv2d)
    with torch.no_grad():
        y = conv(x)
        scale_in = input_scale(x, wl_input)
        rows = im2col(F.pad(x, conv.padding), conv.kernel_size, conv.stride, conv.dilation)
        expected = conv.core(rows.reshape(-1, rows.shape[-1]), scale_in)
    expected = expected.view(6, -1, 7).transpose(1, 2).reshape(y.shape) + layer.bias.view(1, -1, 1, 1)
    assert torch.equal(y, expected)


def test_integer_rows_without_their_scale_are_an_error() -> None:
    core = CrossbarCore(torch.randn(4, 10), HWConfig(wl_input=8, subArray=8), name="fc")
    with pytest.raises(ValueError, match="fc: integer input levels need their scale_in"):
        core(torch.zeros(3, 10, dtype=torch.int8))


def test_input_levels_take_the_narrowest_integer_type() -> None:
    from nipa.hardware.quant import input_levels, quantize_input

    x = torch.randn(100)
    for bits, dtype in [(4, torch.int8), (8, torch.int8), (9, torch.int16), (16, torch.int16), (17, torch.int32)]:
        expected, scale = quantize_input(x, bits)
        levels = input_levels(x, bits, scale)
        assert levels.dtype == dtype
        assert torch.equal(levels.float(), expected)
        assert torch.equal(quantize_input(levels, bits, scale)[0], expected)  # levels pass through
    with pytest.raises(ValueError, match="need the scale"):
        quantize_input(levels, 17)


def test_a_growing_workspace_frees_the_smaller_buffer_first(monkeypatch) -> None:
    """Holding the old buffer while allocating the new one would add its size to the peak memory."""
    import weakref

    from nipa.simulator import crossbar

    crossbar._workspace("test-growth", (10,), torch.float32, torch.device("cpu"))
    old = weakref.ref(crossbar._WORKSPACES[("test-growth", torch.float32, "cpu")])
    alive_at_allocation = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        alive_at_allocation.append(old() is not None)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(crossbar.torch, "empty", empty)
    grown = crossbar._workspace("test-growth", (1000,), torch.float32, torch.device("cpu"))
    assert grown.shape == (1000,) and alive_at_allocation == [False]
    crossbar._WORKSPACES.pop(("test-growth", torch.float32, "cpu"))
