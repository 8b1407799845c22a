"""nipa.hardware.cost: counts of a hand-computed layer, monotonicity in ADC bits, the ADC_share trade of area for
latency, coefficient overrides, layer shapes from hooks, and ISAAC's published ADC share of tile power
and area."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nipa.hardware.config import HWConfig
from nipa.hardware.cost import CostCoefficients, LayerShape, hardware_cost, layer_shapes, point_cost


def test_counts_of_a_hand_computed_layer():
    # fan-in 300 on 128 rows: T = 3 tiles; 8-bit weights in 1-bit cells: K = 7 slices; 10 outputs ->
    # 70 column pairs = 140 columns per tile, in 256-column arrays: G = 1 group, 3 arrays.
    # 8-bit inputs: 7 cycles; 49 output positions.
    layer = LayerShape("conv", fan_in=300, out_features=10, positions=49)
    cost = hardware_cost([layer], 8, 8, 128, 5, 1, adc_share=16, columns=256)
    assert cost["arrays"][0] == 3
    assert cost["adcs"][0] == 3 * 8  # 128 pairs per array / 16 pairs per ADC
    assert cost["cells"][0] == 3 * 128 * 256
    assert cost["weight_cells"][0] == 2 * 10 * 7 * 300
    assert cost["conversions"][0] == 3 * 7 * 7 * 49 * 10  # tiles x input cycles x slices x positions x outputs
    assert cost["row_activations"][0] == 1 * 300 * 7 * 49
    # one input cycle: 16 conversions per ADC at 1.28 * 9/6 GS/s = 8.3 ns < the 100 ns crossbar read
    assert cost["latency_us"][0] == pytest.approx(49 * 7 * 100e-3)
    c = CostCoefficients()
    assert c.adc_energy(5) * cost["conversions"][0] / 1e3 < cost["energy_nj"][0]

    # 2-bit cells: K = 4, 40 pairs; 64 columns per array: G = ceil(80 / 64) = 2 groups
    cost = hardware_cost([layer], 9, 8, 128, 5, 2, adc_share=16, columns=64)
    assert cost["arrays"][0] == 3 * 2
    assert cost["adcs"][0] == 6 * 2  # 32 pairs per array, 16 per ADC
    assert cost["conversions"][0] == 3 * 7 * 4 * 49 * 10


def test_more_adc_bits_cost_more_energy_and_area():
    layers = [LayerShape("a", 576, 64, 196), LayerShape("b", 1024, 10, 1)]
    bits = np.arange(1, 13)
    cost = hardware_cost(layers, 8, 8, 128, bits, 1, 8, 256, breakdown=True)
    assert np.all(np.diff(cost["energy_nj"]) > 0) and np.all(np.diff(cost["area_mm2"]) > 0)
    adc = cost["energy_parts_nj"]["adc"]
    # above a few bits the ADC energy about doubles per bit (Murmann's survey), below it levels off
    ratio = adc[1:] / adc[:-1]
    assert np.all(ratio[bits[1:] >= 8] > 1.85) and np.all(ratio[bits[1:] >= 8] <= 2.0)
    assert np.all(ratio[bits[1:] <= 3] < 1.3)
    # and the other parts do not depend on the ADC resolution
    assert np.ptp(cost["energy_parts_nj"]["dac"]) == 0 and np.ptp(cost["area_parts_mm2"]["crossbar"]) == 0


def test_adc_share_trades_area_for_latency():
    layers = [LayerShape("fc", 512, 256, 1)]
    share = np.array([1, 4, 16, 64, 256])
    cost = hardware_cost(layers, 8, 8, 128, 8, 1, share, 512)
    assert np.all(np.diff(cost["adcs"]) < 0) and np.all(np.diff(cost["area_mm2"]) < 0)
    assert np.all(np.diff(cost["latency_us"]) >= 0)
    assert cost["latency_us"][-1] > cost["latency_us"][0]  # 256 conversions per ADC outlast the read
    # 256 conversions at 1.28 GS/s = 200 ns per input cycle, 7 cycles
    assert cost["latency_us"][-1] == pytest.approx(7 * 256 / 1.28 * 1e-3)
    # the conversions themselves, and so the ADC energy, do not depend on the sharing
    assert np.ptp(cost["conversions"]) == 0 and np.ptp(cost["energy_nj"]) == pytest.approx(0, abs=1e-9)


def test_more_input_bits_and_larger_layers_cost_more():
    small, large = [LayerShape("x", 100, 10, 4)], [LayerShape("x", 1000, 10, 4)]
    a = hardware_cost(small, 8, np.array([4, 8]), 128, 6, 1, 8, 256)
    assert a["latency_us"][1] > a["latency_us"][0] and a["energy_nj"][1] > a["energy_nj"][0]
    assert a["area_mm2"][1] == a["area_mm2"][0]  # input bits are time, not hardware
    b = hardware_cost(large, 8, 8, 128, 6, 1, 8, 256)
    assert b["area_mm2"][0] > a["area_mm2"][1] and b["energy_nj"][0] > a["energy_nj"][1]


def test_overrides_replace_coefficients_and_bad_ones_are_refused():
    layer = [LayerShape("x", 256, 32, 1)]
    base = point_cost(layer, HWConfig(), 8, 256)
    cheaper = point_cost(layer, HWConfig(), 8, 256, CostCoefficients.with_overrides({"adc_energy_pj": 0.5}))
    assert cheaper["energy_parts_nj"]["adc"] == pytest.approx(base["energy_parts_nj"]["adc"] / 3.125)
    assert cheaper["energy_parts_nj"]["dac"] == base["energy_parts_nj"]["dac"]
    with pytest.raises(ValueError, match="unknown cost coefficient"):
        CostCoefficients.with_overrides({"adc_energy": 1.0})
    with pytest.raises(ValueError, match="positive"):
        CostCoefficients.with_overrides({"cell_area_um2": -1.0})


def test_layer_shapes_from_hooks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 7 * 7, 10))
    shapes = layer_shapes(model, ["0", "2", "4"], torch.zeros(1, 3, 16, 16))
    assert [(s.fan_in, s.out_features, s.positions) for s in shapes] == [
        (27, 8, 256), (72, 4, 49), (196, 10, 1)]
    tokens = nn.Linear(16, 32)
    assert layer_shapes(nn.Sequential(tokens), ["0"], torch.zeros(1, 5, 16))[0].positions == 5
    assert layer_shapes(nn.Sequential(tokens), ["0"], torch.zeros(5, 16))[0].positions == 5  # tokens flattened
    assert layer_shapes(model, ["0"], torch.zeros(2, 3, 16, 16), inferences=2)[0].positions == 256


def test_isaac_tile_breakdown():
    """ISAAC (ISCA 2016) reports its ADCs as 58% of a tile's power and 31% of its area. A tile holds 96
    crossbars of 128 rows whose 128 converted columns share one 8-bit ADC at 1.28 GS/s, fed 16-bit inputs.
    Here: a layer that fills 96 arrays of 128 rows x 128 column pairs, one ADC per array, 17-bit signed
    inputs (16 cycles). The coefficients come from ISAAC's component table, so this checks that the
    event and unit counts reassemble the published breakdown; factor stated: 1.25. (Our arrays hold
    differential pairs, twice ISAAC's cells per converted column, which raises the crossbar's share.)"""
    layer = [LayerShape("isaac", fan_in=128, out_features=128 * 96 // 4, positions=1)]
    cost = hardware_cost(layer, 9, 17, 128, 8, 2, adc_share=128, columns=256, breakdown=True)
    assert cost["arrays"][0] == 96 and cost["adcs"][0] == 96
    assert cost["latency_us"][0] == pytest.approx(16 * 0.1)  # 16 cycles of 100 ns
    power_w = cost["energy_nj"][0] * 1e-9 / (cost["latency_us"][0] * 1e-6)
    assert 0.330 / 1.25 < power_w < 0.330 * 1.25  # ISAAC's tile: 330 mW
    assert 0.372 / 1.25 < cost["area_mm2"][0] < 0.372 * 1.25  # and 0.372 mm^2
    power_share = cost["energy_parts_nj"]["adc"][0] / cost["energy_nj"][0]
    area_share = cost["area_parts_mm2"]["adc"][0] / cost["area_mm2"][0]
    assert 0.58 / 1.25 < power_share < 0.58 * 1.25
    assert 0.31 / 1.25 < area_share < 0.31 * 1.25


def test_isaac_adc_figure_of_merit_is_in_the_survey_range():
    """Walden figure of merit E / 2^b of the default 8-bit ADC: 6.1 fJ per conversion step, inside the
    range B. Murmann's survey shows for GS/s-class SAR ADCs (roughly 1 to 100 fJ per step)."""
    fom_fj = float(CostCoefficients().adc_energy(8)) * 1e3 / 2**8
    assert 1.0 < fom_fj < 100.0
