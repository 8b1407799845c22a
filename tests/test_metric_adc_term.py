"""The metric's ADC term that follows the ground truth's ADC mode (nipa.estimation.metric.adc_step) and the tile
range ratio of the statistics it uses (nipa.estimation.stats)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from nipa.errors import UserError
from nipa.estimation.metric import adc_step, nipa_metric, per_layer_nipa
from nipa.estimation.stats import model_statistics
from nipa.hardware.config import HWConfig


def stats_of(*layers: nn.Module, combos=((8, 128, 1),)):
    return model_statistics(nn.Sequential(*layers), combos)


def test_tile_range_ratio_by_hand() -> None:
    """Two tiles of 2 rows, 3-bit weights (magnitudes 0..3, 2 slices of 1 bit). Per tile and slice the
    largest column sum of |s_k| over the output channels: tile 0 (rows 0-1) and tile 1 (rows 2-3)."""
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        # per (channel, tile) scales are max|w| / 3, so the levels are exactly these integers
        layer.weight.copy_(torch.tensor([[3.0, 1.0, 3.0, 0.0], [-2.0, 3.0, 1.0, 1.0]]))
    combo = stats_of(layer, combos=((3, 2, 1),)).get(3, 2, 1)
    # levels: channel 0: tile 0 (3, 1), tile 1 (3, 0); channel 1: tile 0 (-2, 3), tile 1 (3, 3) after
    # rescaling tile 1 of channel 1 by its max 1 -> levels (3, 3).
    # slice 0 (bit 0): |s0| sums per (channel, tile): ch0 t0: 1+1 = 2, ch0 t1: 1+0 = 1, ch1 t0: 0+1 = 1, ch1 t1: 2
    # slice 1 (bit 1): ch0 t0: 1+0 = 1, ch0 t1: 1+0 = 1, ch1 t0: 1+1 = 2, ch1 t1: 1+1 = 2
    # max over channels R_t: slice 0: (2, 2) -> ratio 1; slice 1: (2, 2) -> ratio 1
    np.testing.assert_allclose(combo.tile_range_ratio[0], [1.0, 1.0])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 3.0, 3.0, 0.0], [3.0, 3.0, 0.0, 3.0]]))
    combo = stats_of(layer, combos=((3, 2, 1),)).get(3, 2, 1)
    # R_t (both slices): tile 0 max(2, 2) = 2, tile 1 max(1, 1) = 1: max 2 / sqrt((4 + 1) / 2)
    np.testing.assert_allclose(combo.tile_range_ratio[0], [2 / np.sqrt(2.5)] * 2)


def test_tile_range_ratio_is_one_for_one_tile_and_above_for_a_short_last_tile() -> None:
    torch.manual_seed(0)
    stats = stats_of(nn.Linear(100, 32), nn.Linear(300, 32))
    ratio = stats.get(8, 128, 1).tile_range_ratio
    np.testing.assert_allclose(ratio[0], 1.0)
    assert (ratio[1] > 1.05).all()  # 3 tiles: 128, 128 and 44 rows


def test_adc_step_follows_the_adc_mode() -> None:
    density = np.array([0.5, 0.25])
    ratio = np.array([1.3, 1.1])
    published = 128 * density / 2**5
    np.testing.assert_allclose(adc_step(density, 128, 5, 1, "dynamic_tile", ratio), published)
    np.testing.assert_allclose(adc_step(density, 128, 5, 1, "dynamic", ratio), published * ratio)
    np.testing.assert_allclose(adc_step(density, 128, 5, 1, "calibrated", ratio), published * ratio)
    np.testing.assert_allclose(adc_step(density, 128, 5, 2, "full", ratio), [2 * 128 * 3 / 32] * 2)
    with pytest.raises(UserError, match="stat.py --overwrite"):
        adc_step(density, 128, 5, 1, "dynamic", None)
    np.testing.assert_allclose(adc_step(density, 128, 5, 1, "full", None), [2 * 128 / 32] * 2)


def test_shared_range_lowers_nipa_of_multi_tile_points_only() -> None:
    torch.manual_seed(1)
    stats = stats_of(nn.Linear(100, 32), nn.Linear(300, 32), combos=((8, 128, 1), (8, 512, 1)))
    for mode in ("dynamic", "calibrated"):
        hw = HWConfig(wl_weight=8, subArray=128, ADCprecision=4, vari=0.1, adc_mode=mode)
        shared = per_layer_nipa(stats, hw)
        published = per_layer_nipa(stats, hw, adc_term="published")
        assert shared[0] == pytest.approx(published[0], rel=1e-12)  # one tile: nothing shared
        assert shared[1] < published[1]
        assert nipa_metric(stats, hw) < nipa_metric(stats, hw, adc_term="published")
    tile = HWConfig(wl_weight=8, subArray=128, ADCprecision=4, vari=0.1, adc_mode="dynamic_tile")
    assert nipa_metric(stats, tile) == pytest.approx(nipa_metric(stats, tile, adc_term="published"), rel=1e-12)
    one_tile = HWConfig(wl_weight=8, subArray=512, ADCprecision=4, vari=0.1)
    assert nipa_metric(stats, one_tile) == pytest.approx(nipa_metric(stats, one_tile, adc_term="published"),
                                                         rel=1e-12)
    # full scale: a coarser step than the data's own range, so more ADC noise than the published term
    full = dataclasses.replace(tile, adc_mode="full")
    assert nipa_metric(stats, full) < nipa_metric(stats, full, adc_term="published")


def test_statistics_without_the_ratio_are_refused_only_where_needed() -> None:
    torch.manual_seed(2)
    stats = stats_of(nn.Linear(300, 32))
    combo = stats.get(8, 128, 1)
    combo.tile_range_ratio = None  # a file of format 2
    with pytest.raises(UserError, match="tile_range_ratio"):
        nipa_metric(stats, HWConfig(subArray=128))
    assert nipa_metric(stats, HWConfig(subArray=128), adc_term="published") > 0
    assert nipa_metric(stats, HWConfig(subArray=128, adc_mode="dynamic_tile")) > 0


def test_input_rounding_term_sees_input_bits_and_keeps_rankings_at_fixed_bits() -> None:
    torch.manual_seed(3)
    stats = stats_of(nn.Linear(300, 32), combos=((8, 128, 1), (6, 128, 1)))
    points = [HWConfig(wl_weight=w, subArray=128, ADCprecision=a, vari=v, wl_input=8)
              for w in (8, 6) for a in (4, 6) for v in (0.0, 0.2)]
    plain = np.asarray(nipa_metric(stats, points))
    rounding = np.asarray(nipa_metric(stats, points, input_term="rounding"))
    assert (rounding < plain).all()
    assert (np.argsort(rounding) == np.argsort(plain)).all()  # one wl_input: a monotone transform
    # share = (1/12) / ((2^(a-1) - 1)/3)^2: 1/NIPA grows by exactly that
    np.testing.assert_allclose(1 / rounding - 1 / plain, (1 / 12) / (127 / 3) ** 2, rtol=1e-9)
    few_bits = [dataclasses.replace(p, wl_input=4) for p in points]
    assert (np.asarray(nipa_metric(stats, few_bits, input_term="rounding")) < rounding).all()
    assert np.allclose(np.asarray(nipa_metric(stats, few_bits)), plain)  # the published metric cannot tell


def test_input_bits_term_scales_the_adc_noise_by_the_input_shift_and_add() -> None:
    """adc_term "input_bits": the ground-truth ADC noise times input_adc_factor(wl_input), which is 1 at 8-bit
    inputs (so the published 8-bit spaces rank as before) and 3 (4^(a-1) - 1) / (2^(a-1) - 1)^2 over its
    8-bit value otherwise."""
    from nipa.estimation.metric import input_adc_factor, layer_slice_noise

    torch.manual_seed(0)
    stats = stats_of(nn.Linear(300, 16), combos=((6, 128, 1),))
    assert input_adc_factor(8) == pytest.approx(1.0)
    assert input_adc_factor(4) == pytest.approx((3 * 63 / 49) / (3 * 16383 / 127**2))
    assert input_adc_factor(4) > input_adc_factor(6) > 1.0
    for bits in (4, 6, 8):
        hw = HWConfig(wl_weight=6, wl_input=bits, subArray=128, ADCprecision=4, cellBit=1)
        truth = layer_slice_noise(stats, hw, adc_term="ground_truth")["adc"]
        scaled = layer_slice_noise(stats, hw, adc_term="input_bits")["adc"]
        np.testing.assert_allclose(scaled, truth * input_adc_factor(bits), rtol=1e-12)
    eight = HWConfig(wl_weight=6, wl_input=8, subArray=128, ADCprecision=4, cellBit=1)
    four = dataclasses.replace(eight, wl_input=4)
    assert nipa_metric(stats, eight, adc_term="input_bits") == pytest.approx(nipa_metric(stats, eight))
    assert nipa_metric(stats, four, adc_term="input_bits") < nipa_metric(stats, four)
