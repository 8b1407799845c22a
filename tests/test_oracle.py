"""The crossbar simulator against an independent float64 oracle of SPEC section 4 (tests/helpers/oracle.py).

The oracle shares no code with `nipa.hardware.quant` / `nipa.simulator.crossbar` /
`nipa.hardware.device_errors`, so a misreading
of the method that both the fast path and `nipa.simulator.reference` would share shows up here. With device
error both are handed the same programmed conductances (the simulator's `core.conductance`).

Agreement is asked to float32 rounding: |y_sim - y_oracle| <= 1e-5 max|y_oracle|, plus, only with
device error (non-integer partial sums, summed in float32 by the simulator and in float64 here), the
change a flip of the ADC reads lying within TIE_MARGIN steps of a rounding tie could make. Without
device error the partial sums are exact integers in both, so exact ties must round the same way
(half to even) and get no slack.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from nipa.hardware.config import HWConfig
from nipa.simulator.crossbar import calibrate_adc, convert, crossbar_cores
from tests.helpers import oracle

REL_TOL = 1e-5
TIE_MARGIN = 2e-3  # in ADC steps: well above the float32 error of a partial sum over <= 128 rows


def _hw(**values) -> HWConfig:
    return HWConfig(**values)


def _simulate(layer: nn.Module, hw: HWConfig, x: torch.Tensor, calibration: list[torch.Tensor] | None = None,
              seed: int = 3) -> tuple[np.ndarray, torch.Tensor]:
    """The simulator's output and its programmed reads [T, rows, K*out]."""
    sim = convert(layer, hw, seed=seed, chip=0)
    if calibration is not None:
        calibrate_adc(sim, calibration)
    with torch.no_grad():
        y = sim(x)
    return y.double().numpy(), crossbar_cores(sim)[0].conductance


def _assert_agrees(y_sim: np.ndarray, result: oracle.OracleResult, what: str, tie_slack: bool = False) -> None:
    """Agreement to float32 rounding; `tie_slack`: also allow the flips of the reads near a tie."""
    y = result.y
    peak = np.abs(y).max()
    error = np.abs(y_sim - y)
    bound = REL_TOL * peak + (result.tie_slack * (1 + 1e-6) if tie_slack else 0.0)
    bad = error > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} outputs disagree; max |diff| {error.max():.6g} "
        f"= {error.max() / peak:.3g} of max|y| {peak:.6g}; reads at or near a rounding tie: {result.near_ties}")


def _forward(layer: nn.Module, x: torch.Tensor, hw: HWConfig, with_error: bool = False,
             **options) -> oracle.OracleResult:
    """The oracle's output; with device error the reads near a tie are counted and bounded (slack),
    without it only the exact ties are counted (for the failure message)."""
    return oracle.layer_forward(layer, x, hw, tie_margin=TIE_MARGIN if with_error else 1e-9, **options)


# ---- golden cases, worked out by hand ------------------------------------------------------------
#
# W = [[7, -2, 5, 0], [-3, 6, 1, -7]], wl_weight 4 (levels 7): each row's max |w| is 7, so scale 1, q = W.
# cellBit 2: K = ceil(3 / 2) = 2 digits of base 4, s0 = sign * (|q| mod 4), s1 = sign * floor(|q| / 4):
#   s0 = [[3, -2, 1, 0], [-3, 2, 1, -3]],  s1 = [[1, 0, 1, 0], [0, 1, 0, -1]]   (s0 + 4 s1 = q)
# X = [[3, 1, -2, 2], [-1, 2, 3, 0]], wl_input 3 (levels 3): max |x| = 3, scale 1, x_q = X; Z = 2 bits:
#   row a: x0 = [1, 1, 0, 0], x1 = [1, 0, -1, 1];  row b: x0 = [-1, 0, 1, 0], x1 = [0, 1, 1, 0]
# Partial sums P[z, k] = x_z . s_k (rows a, b; columns 0, 1), subArray 4 = fan-in: one tile:
#   P00: a (1, -1)  b (-2, 4)      P01: a (1, 1)   b (0, 0)
#   P10: a (2, -7)  b (-1, 3)      P11: a (0, -1)  b (1, 1)
# Exact: y = P00 + 4 P01 + 2 P10 + 8 P11 = [[9, -19], [4, 18]] = X W^T.  Bias [0.5, -1] is added last.
GOLDEN_W = [[7.0, -2.0, 5.0, 0.0], [-3.0, 6.0, 1.0, -7.0]]
GOLDEN_BIAS = [0.5, -1.0]
GOLDEN_X = [[3.0, 1.0, -2.0, 2.0], [-1.0, 2.0, 3.0, 0.0]]
# Calibration data: x_q = [1, 0, 0, 3] (scale 1): x0 = [1, 0, 0, 1], x1 = [0, 0, 0, 1].
#   k = 0: z0 (3, -6), z1 (0, -3) -> range [-6, 3];  k = 1: z0 (1, -1), z1 (0, -1) -> range [-1, 1].
GOLDEN_CALIBRATION_X = [[1.0, 0.0, 0.0, 3.0]]

GOLDEN_CASES = {
    # dynamic, ADC 3 bits (8 steps), one range per (z, k) over rows and columns:
    #   P00 in [-2, 4], step 0.75: 1 -> idx 4 -> 1; -1 -> 1.33 -> 1 -> -1.25; -2 -> -2; 4 -> 4
    #   P01 in [0, 1], step 1/8: exact.   P11 in [-1, 1], step 1/4: exact.
    #   P10 in [-7, 3], step 1.25: 2 -> 7.2 -> 7 -> 1.75; -7 -> -7; -1 -> 4.8 -> 5 -> -0.75; 3 -> 3
    #   a0 = 1 + 4 + 2*1.75 + 0 = 8.5;  a1 = -1.25 + 4 - 14 - 8 = -19.25
    #   b0 = -2 + 0 - 1.5 + 8 = 4.5;     b1 = 4 + 0 + 6 + 8 = 18;   plus the bias.
    "dynamic": (dict(subArray=4, adc_mode="dynamic"), [[9.0, -20.25], [5.0, 17.0]]),
    # full, subArray 4: range +-4*3 = +-12, step 3, read = -12 + 3 round((P + 12) / 3):
    #   P00: 1 -> 4.33 -> 0; -1 -> 3.67 -> 0; -2 -> 3.33 -> -3; 4 -> 5.33 -> 3
    #   P01, P11 (values in -1..1) -> 0.   P10: 2 -> 4.67 -> 3; -7 -> 1.67 -> -6; -1 -> 0; 3 -> 5 -> 3
    #   y = P00 + 2 P10 = [[0 + 6, 0 - 12], [-3 + 0, 3 + 6]] = [[6, -12], [-3, 9]]; plus the bias.
    "full": (dict(subArray=4, adc_mode="full"), [[6.5, -13.0], [-2.5, 8.0]]),
    # full, subArray 8 > fan-in 4: the range is the physical +-8*3 = +-24 all the same, step 6:
    #   P00: 1, -1, -2 -> 0; 4 -> 4.67 -> 6.   P10: 2 -> 4.33 -> 0; -7 -> 2.83 -> 3 -> -6; -1 -> 0;
    #   3 -> 27 / 6 = 4.5, an exact tie: half to even -> 4 -> 0 (half up would give 6 and b1 = 18).
    #   P01, P11 -> 0.   y = [[0, -12], [0, 6]]; plus the bias.
    "full_wide": (dict(subArray=8, adc_mode="full"), [[0.5, -13.0], [0.5, 5.0]]),
    # calibrated on GOLDEN_CALIBRATION_X: k = 0 in [-6, 3], step 9/8; k = 1 in [-1, 1], step 1/4.
    #   P00: 1 -> 6.22 -> 0.75; -1 -> 4.44 -> -1.5; -2 -> 3.56 -> 4 -> -1.5; 4 -> 8.89 -> clamp 8 -> 3
    #   P10: 2 -> 7.11 -> 1.875; -7 -> -0.89 -> clamp 0 -> -6; -1 -> 4.44 -> -1.5; 3 -> 8 -> 3
    #   P01, P11 lie in [-1, 1] on multiples of 1/4: exact.
    #   a0 = 0.75 + 4 + 3.75 + 0 = 8.5;  a1 = -1.5 + 4 - 12 - 8 = -17.5
    #   b0 = -1.5 + 0 - 3 + 8 = 3.5;      b1 = 3 + 0 + 6 + 8 = 17;   plus the bias.
    "calibrated": (dict(subArray=4, adc_mode="calibrated"), [[9.0, -18.5], [4.0, 16.0]]),
}


def _golden_layer() -> nn.Linear:
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(GOLDEN_W))
        layer.bias.copy_(torch.tensor(GOLDEN_BIAS))
    return layer


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_golden_hand_computed(case: str) -> None:
    values, expected = GOLDEN_CASES[case]
    hw = _hw(wl_weight=4, wl_input=3, ADCprecision=3, cellBit=2, **values)
    layer = _golden_layer()
    x = torch.tensor(GOLDEN_X)
    calibration = [torch.tensor(GOLDEN_CALIBRATION_X)] if hw.adc_mode == "calibrated" else None
    calibrated_range = None
    if calibration is not None:
        calibrated_range = oracle.calibrate(layer, calibration, hw)
        np.testing.assert_array_equal(calibrated_range, [[-6.0, 3.0], [-1.0, 1.0]])
    result = oracle.layer_forward(layer, x, hw, calibrated_range=calibrated_range)
    np.testing.assert_array_equal(result.y, expected)
    y_sim, _ = _simulate(layer, hw, x, calibration)
    np.testing.assert_allclose(y_sim, expected, rtol=0, atol=1e-5)


def test_golden_exact_tie_rounds_half_to_even() -> None:
    # Six weights 1.0 (wl_weight 4: scale 1/7, q = 7), cellBit 3: K = 1 slice, s = 7 on every row.
    # Six inputs -1.0 (wl_input 2: levels 1, scale 1): one bit plane x0 = -1. P = 6 * 7 * (-1) = -42.
    # full, subArray 32, ADC 4 bits: range +-32*7 = +-224, step 448/16 = 28; (P + 224) / 28 = 182 / 28
    # = 6.5, an exact tie: half to even -> index 6 -> read -224 + 168 = -56; y = (1/7) * -56 = -8.
    # (Index 7, rounding the tie up, would read -28 and give y = -4.)
    layer = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    hw = _hw(wl_weight=4, wl_input=2, subArray=32, ADCprecision=4, cellBit=3, adc_mode="full")
    x = -torch.ones(1, 6)
    np.testing.assert_allclose(oracle.layer_forward(layer, x, hw).y, [[-8.0]], rtol=1e-12)
    y_sim, _ = _simulate(layer, hw, x)
    np.testing.assert_allclose(y_sim, [[-8.0]], rtol=1e-6)


def test_golden_exact_without_adc_error() -> None:
    # A 24-bit ADC: every read is within 2^-22 of exact, y = X W^T + bias.
    hw = _hw(wl_weight=4, wl_input=3, subArray=4, ADCprecision=24, cellBit=2)
    result = oracle.layer_forward(_golden_layer(), torch.tensor(GOLDEN_X), hw)
    np.testing.assert_allclose(result.y, [[9.5, -20.0], [4.5, 17.0]], rtol=0, atol=1e-5)


# ---- the oracle on its own ----------------------------------------------------------------------


def test_oracle_slices_recombine_and_quantize() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 37))
    for bits, cell in [(8, 1), (8, 2), (8, 3), (7, 3), (5, 2)]:
        q, scale = oracle.quantize_weight(weight, bits, 16)
        slices = oracle.slice_weight(q, bits, cell)
        assert slices.shape[0] == oracle.num_slices(bits, cell)
        recombined = sum(2 ** (cell * k) * slices[k] for k in range(slices.shape[0]))
        np.testing.assert_array_equal(recombined, q)
        assert np.abs(slices).max() <= 2**cell - 1
        # Each (channel, tile) reaches the top level exactly once its max-abs weight is mapped.
        assert np.all(np.abs(q).max(axis=-1) == 2 ** (bits - 1) - 1)
        assert q.shape == (5, 3, 16) and scale.shape == (5, 3)


def test_oracle_im2col_matches_torch_conv() -> None:
    # The oracle's own im2col against PyTorch's convolution, in float64, on fake-quantized weights.
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    rows, out_h, out_w = oracle.im2col(x.numpy(), layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    weight = layer.weight.detach().numpy().reshape(4, -1)
    y = (rows @ weight.T).reshape(2, out_h, out_w, 4).transpose(0, 3, 1, 2)
    y = y + layer.bias.detach().numpy()[None, :, None, None]
    np.testing.assert_allclose(y, layer(x).detach().numpy(), rtol=1e-12, atol=1e-12)


SANITY_LAYERS = {
    "linear_300_on_128": (lambda: nn.Linear(300, 6), (9, 300), 128),
    "conv_36_on_16": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (2, 4, 7, 7), 16),
}


@pytest.mark.parametrize("mode", ["dynamic", "dynamic_tile", "full", "calibrated"])
@pytest.mark.parametrize("name", list(SANITY_LAYERS))
def test_oracle_with_ideal_adc_is_fake_quantization(name: str, mode: str) -> None:
    make, shape, rows = SANITY_LAYERS[name]
    torch.manual_seed(2)
    layer, x = make(), torch.randn(shape)
    for cell in (1, 2, 3):
        hw = _hw(wl_weight=8, wl_input=8, subArray=rows, ADCprecision=24, cellBit=cell, onoffratio=10)
        calibrated_range = oracle.calibrate(layer, [x], hw) if mode == "calibrated" else None
        result = oracle.layer_forward(layer, x, hw, mode=mode, calibrated_range=calibrated_range)
        expected = oracle.fake_quantized_layer(layer, x, hw)
        # Each read is off by at most half a step; the full scale's step 2 S (2^c - 1) / 2^24 is the
        # widest. Bound: scale_in * (2^Z - 1) * sum_k 2^(ck) * sum_t scale_w * step / 2.
        _, scale_w = oracle.quantize_weight(oracle.weight_matrix(layer), 8, rows)
        _, scale_in = oracle.layer_rows(layer, x, hw)
        step = 2 * rows * (2**cell - 1) / 2**24
        significance = (2**7 - 1) * sum(2 ** (cell * k) for k in range(oracle.num_slices(8, cell)))
        bound = scale_in * significance * scale_w.sum(axis=1).max() * step / 2
        np.testing.assert_allclose(result.y, expected, rtol=0, atol=bound + 1e-9 * np.abs(expected).max())
        assert np.abs(result.y - expected).max() < 1e-4 * np.abs(expected).max()


def test_oracle_dynamic_range_spans_tiles() -> None:
    # Per SPEC: one range over all tiles. dynamic_tile differs on several tiles, not on one.
    torch.manual_seed(4)
    hw = _hw(wl_weight=8, wl_input=8, subArray=32, ADCprecision=4, cellBit=2)
    multi, x_multi = nn.Linear(75, 6), torch.randn(16, 75)
    shared = oracle.layer_forward(multi, x_multi, hw, mode="dynamic").y
    per_tile = oracle.layer_forward(multi, x_multi, hw, mode="dynamic_tile").y
    assert np.abs(shared - per_tile).max() > 1e-3 * np.abs(shared).max()
    single, x_single = nn.Linear(32, 6), torch.randn(16, 32)
    np.testing.assert_array_equal(oracle.layer_forward(single, x_single, hw, mode="dynamic").y,
                                  oracle.layer_forward(single, x_single, hw, mode="dynamic_tile").y)


# ---- the simulator against the oracle -----------------------------------------------------------

# name: (layer factory, input shape, subArray). Fan-in below, equal to and above subArray (not a multiple).
LAYERS = {
    "linear_20_on_32": (lambda: nn.Linear(20, 6), (12, 20), 32),
    "linear_32_on_32": (lambda: nn.Linear(32, 6), (12, 32), 32),
    "linear_75_on_32": (lambda: nn.Linear(75, 6), (12, 75), 32),
    "linear_300_on_128": (lambda: nn.Linear(300, 5), (8, 300), 128),
    "conv_27_on_64": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), 64),
    "conv_27_on_27": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5), 27),
    "conv_36_on_16": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (2, 4, 7, 7), 16),
}
MODES = ["dynamic", "dynamic_tile", "calibrated", "full"]
ERRORS = {
    "ideal_cells": {},
    "vari0.2": dict(vari_type="state_dependent", vari=0.2),
    "vari0.2_saf0.02": dict(vari_type="state_dependent", vari=0.2, SAF_prop=0.02),
}


def _grid() -> list:
    """Every layer x ADC mode x device error x cellBit (1-3); ADC bits (3-8) rotate so that every
    (mode, cellBit, ADC bits) triple occurs; weight bits (6-8) and on/off ratio (10, 1e8) rotate too."""
    cases = []
    for (li, layer), (mi, mode), (ei, error), cell in itertools.product(
            enumerate(LAYERS), enumerate(MODES), enumerate(ERRORS), (1, 2, 3)):
        adc = 3 + (li + 2 * mi + ei + 3 * (cell - 1)) % 6
        bits = (8, 7, 6)[(li + 2 * mi + cell) % 3]
        ratio = 10.0 if (li + mi + ei + cell) % 2 == 0 else 1e8
        cases.append(pytest.param(layer, mode, error, cell, adc, bits, ratio,
                                  id=f"{layer}-{mode}-{error}-c{cell}-adc{adc}-w{bits}-R{ratio:g}"))
    return cases


def _inputs(shape: tuple[int, ...], seed: int, uniform: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if uniform:
        return torch.rand(shape, generator=generator) * 2 - 1
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("layer_name, mode, error, cell, adc, bits, ratio", _grid())
def test_simulator_matches_oracle(layer_name: str, mode: str, error: str, cell: int, adc: int, bits: int,
                                  ratio: float) -> None:
    make, shape, rows = LAYERS[layer_name]
    torch.manual_seed(10)
    layer = make()
    hw = _hw(wl_weight=bits, wl_input=8, subArray=rows, ADCprecision=adc, cellBit=cell, onoffratio=ratio,
             adc_mode=mode, **ERRORS[error])
    x = _inputs(shape, 11)
    calibration = None
    if mode == "calibrated":
        # Calibrated on Gaussian batches, evaluated on uniform data: other reads, some of them saturate.
        calibration = [_inputs(shape, 12), _inputs(shape, 13)]
        x = _inputs(shape, 14, uniform=True)
    y_sim, columns = _simulate(layer, hw, x, calibration)
    with_error = hw.has_device_error
    if not with_error:
        # The simulator's stored reads are exactly the oracle's own slices (the leaks cancel).
        k = oracle.num_slices(bits, cell)
        q, _ = oracle.quantize_weight(oracle.weight_matrix(layer), bits, rows)
        own = oracle.differential_reads(oracle.slice_weight(q, bits, cell), cell, ratio)
        np.testing.assert_array_equal(oracle.reads_from_columns(columns, k, q.shape[0], rows), own)
    handed = columns if with_error else None
    calibrated_range = oracle.calibrate(layer, calibration, hw, columns=handed) if calibration else None
    result = _forward(layer, x, hw, with_error, columns=handed, calibrated_range=calibrated_range)
    _assert_agrees(y_sim, result, f"{layer_name} {hw.describe()}", tie_slack=with_error)


@pytest.mark.parametrize("adc", [3, 5, 8])
def test_simulator_dynamic_multi_tile_matches_oracle(adc: int) -> None:
    # Several tiles, a larger batch, dynamic (the default): one range over all tiles, per SPEC.
    torch.manual_seed(20)
    layer = nn.Linear(200, 8)
    hw = _hw(wl_weight=8, wl_input=8, subArray=64, ADCprecision=adc, cellBit=2)
    x = _inputs((64, 200), 21)
    y_sim, _ = _simulate(layer, hw, x)
    _assert_agrees(y_sim, _forward(layer, x, hw), f"dynamic multi-tile ADC {adc}")


def test_simulator_dynamic_and_dynamic_tile() -> None:
    # They differ on a multi-tile layer (the oracle says by how much) and agree on a single tile.
    torch.manual_seed(22)
    for fan_in, differ in [(75, True), (32, False)]:
        layer, x = nn.Linear(fan_in, 6), _inputs((16, fan_in), 23)
        outputs = {}
        for mode in ("dynamic", "dynamic_tile"):
            hw = _hw(wl_weight=8, wl_input=8, subArray=32, ADCprecision=4, cellBit=2, adc_mode=mode)
            outputs[mode], _ = _simulate(layer, hw, x)
            _assert_agrees(outputs[mode], _forward(layer, x, hw), f"fan-in {fan_in} {mode}")
        gap = np.abs(outputs["dynamic"] - outputs["dynamic_tile"]).max() / np.abs(outputs["dynamic"]).max()
        assert (gap > 1e-3) if differ else (gap == 0), f"fan-in {fan_in}: relative gap {gap:.3g}"
