"""The NIPA metric (SPEC section 6): closed form against integration, limits, monotonicity, vectorization.

Timing (1,000 hardware points in well under a second) is measured by hand, not tested here: a timing
test fails on a busy machine. `test_points_are_computed_in_one_vectorized_call` checks instead that
many points go through the array core in one call.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from scipy import integrate

import nipa.estimation.metric
from nipa.estimation.metric import (
    adc_noise,
    device_variance,
    layer_slice_noise,
    nipa_metric,
    nipa_terms,
    pair_device_variance,
    per_layer_nipa,
    rank_layers,
    unabsorbed_share,
    weight_rounding_noise,
)
from nipa.estimation.stats import ComboStats, ModelStats, combo_key
from nipa.hardware.config import HWConfig
from nipa.hardware.device_errors import program_pairs
from nipa.hardware.quant import slice_magnitude

LAYERS = ("conv1", "conv2", "fc")


def make_combo(wl_weight: int, subArray: int, cellBit: int, seed: int = 0) -> ComboStats:
    """Plausible synthetic statistics: lower slices busier than higher ones, a few tiles per layer."""
    rng = np.random.default_rng(seed + 1000 * wl_weight + subArray + cellBit)
    k = math.ceil((wl_weight - 1) / cellBit)
    top = 2**cellBit - 1
    density = np.sort(rng.uniform(0.05, 0.6, size=(len(LAYERS), k)), axis=1)[:, ::-1].copy()
    var = density * rng.uniform(0.3, 0.9, size=(len(LAYERS), k)) * (1 + top) / 2
    fan_in = np.array([27, 576, 512])
    # A tile range ratio of 1 (tiles alike): the ground-truth ADC term of a dynamic ADC then equals the
    # published one, which these tests check (tests/test_metric_adc_term.py checks the ratio's effect).
    return ComboStats(wl_weight, subArray, cellBit, LAYERS, var, density, var * 1.05,
                      tiles=-(-fan_in // subArray), fan_in=fan_in, weight_var=np.array([0.02, 0.003, 0.004]),
                      tile_range_ratio=np.ones_like(density))


COMBOS = ((8, 128, 1), (8, 256, 1), (6, 128, 1), (9, 128, 2), (7, 256, 2), (5, 128, 1))


def make_stats(combos=COMBOS) -> ModelStats:
    return ModelStats(meta={"layers": list(LAYERS), "model": "toy", "dataset": "toy"},
                      combos={combo_key(*c): make_combo(*c) for c in combos})


def point(**kw) -> HWConfig:
    base = {"wl_weight": 8, "subArray": 128, "ADCprecision": 5, "cellBit": 1}
    base.update(kw)
    return HWConfig(**base)


# ---- an independent scalar reference ------------------------------------------------------------


def reference_nipa(var, density, tiles, hw: HWConfig) -> tuple[float, float]:
    """(signal, noise) for one point, one set of statistics: plain Python, math.erf, no numpy tricks."""
    s, c, a = hw.subArray, hw.cellBit, hw.ADCprecision
    signal, noise = 0.0, 1.0 / 12.0
    for k, (v, d) in enumerate(zip(var, density, strict=True)):
        weight = 4.0 ** (c * k)
        adc = tiles * s * d * d / (12.0 * 4.0**a)
        if hw.vari_type == "state_dependent":
            sigma2 = hw.vari**2 * v
        elif hw.vari_type == "laplace":
            sigma2 = 2 * hw.laplace_b**2 * v
        else:
            sigma2 = hw.ind_vari**2
        p = hw.SAF_prop
        sigma2 = 2 * p * v + (1 - 2 * p) * sigma2
        share = 0.0
        if sigma2 > 0:
            total = s * sigma2
            half = s * d / 2.0**a / 2
            ratio = half / math.sqrt(total)
            absorbed = total * (math.erf(ratio / math.sqrt(2))
                                - math.sqrt(2 / math.pi) * ratio * math.exp(-ratio**2 / 2))
            share = max(0.0, 1.0 - absorbed / total)
        signal += weight * v
        noise += weight * (adc + sigma2 * share)
    return signal, noise


def random_points(n: int, seed: int = 0) -> list[HWConfig]:
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        w, s, c = rng.choice(COMBOS)
        vari_type = rng.choice(["state_dependent", "state_independent", "laplace"])
        points.append(HWConfig(wl_weight=w, subArray=s, cellBit=c, ADCprecision=rng.randint(3, 9),
                               vari_type=vari_type, vari=rng.choice([0.0, 0.1, 0.2]),
                               ind_vari=rng.choice([0.0, 0.05, 0.3]), laplace_b=rng.choice([0.0, 0.06, 0.18]),
                               SAF_prop=rng.choice([0.0, 1e-4, 1e-2])))
    return points


# ---- the pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_var", [1e-6, 0.01, 3.0])
@pytest.mark.parametrize("bits", [2, 4, 8, 9])
def test_weight_rounding_noise_is_one_twelfth(weight_var: float, bits: int) -> None:
    assert float(weight_rounding_noise(weight_var, bits)) == pytest.approx(1 / 12, rel=1e-12)
    assert float(weight_rounding_noise(0.0, bits)) == pytest.approx(1 / 12)


def test_unabsorbed_share_matches_numerical_integration() -> None:
    checked = 0
    for rows in (1, 16, 128, 256):
        for sigma2 in (1e-4, 0.01, 0.2, 3.0):
            for delta in (1e-3, 0.05, 1.0, 8.0, 64.0, 500.0):
                v = rows * sigma2
                density = lambda x, v=v: x * x * math.exp(-x * x / (2 * v)) / math.sqrt(2 * math.pi * v)  # noqa: E731
                # Beyond 40 standard deviations the integrand is 0 in floating point; cutting there
                # keeps quad from stepping over a narrow peak in a wide interval.
                edge = min(delta / 2, 40 * math.sqrt(v))
                absorbed, _ = integrate.quad(density, -edge, edge, epsabs=1e-14, epsrel=1e-12, limit=200)
                expected = max(0.0, 1.0 - absorbed / v)
                got = float(unabsorbed_share(rows, sigma2, delta))
                assert got == pytest.approx(expected, rel=1e-7, abs=1e-10), (rows, sigma2, delta)
                checked += 1
    assert checked == 96


def test_unabsorbed_share_limits_and_shape() -> None:
    assert float(unabsorbed_share(128, 0.0, 1.0)) == 0.0  # no device error, nothing to absorb
    assert float(unabsorbed_share(128, 0.01, 0.0)) == pytest.approx(1.0)  # no step absorbs nothing
    assert float(unabsorbed_share(128, 0.01, 1e6)) == pytest.approx(0.0, abs=1e-12)  # one huge step
    deltas = np.linspace(0.0, 20.0, 200)
    shares = unabsorbed_share(128, 0.05, deltas)
    assert shares.shape == (200,)
    assert np.all((shares >= 0) & (shares <= 1))
    assert np.all(np.diff(shares) <= 1e-15)  # a coarser ADC step absorbs more


def test_device_variance_per_type() -> None:
    var = np.array([0.5, 0.25])
    np.testing.assert_allclose(device_variance(var, "state_dependent", 0.1), 0.01 * var)
    np.testing.assert_allclose(device_variance(var, "laplace", 0.1), 2 * 0.01 * var)
    np.testing.assert_allclose(device_variance(var, "state_independent", 0.05), [0.0025, 0.0025])
    p = 1e-2
    np.testing.assert_allclose(device_variance(var, "state_dependent", 0.1, p),
                               2 * p * var + (1 - 2 * p) * 0.01 * var)
    np.testing.assert_allclose(device_variance(var, "state_dependent", 0.0, p), 2 * p * var)


def test_adc_noise_formula() -> None:
    assert float(adc_noise(0.5, 128, 5, tiles=3)) == pytest.approx(3 * 128 * 0.25 / (12 * 4**5))


def test_hand_computed_value() -> None:
    # Two slices, c = 1, S = 128, T = 2, 5-bit ADC, no device error.
    var, density = np.array([0.25, 0.2]), np.array([0.5, 0.4])
    signal, noise = nipa_terms(var, density, 2.0, 128, 1, 5, 0, 0.0, 0.0)
    expected = (0.25 + 4 * 0.2) / (1 / 12 + 2 * 128 * 0.25 / (12 * 1024) + 4 * 2 * 128 * 0.16 / (12 * 1024))
    assert float(signal / noise) == pytest.approx(expected, rel=1e-12)


# ---- the metric from statistics ------------------------------------------------------------------


def test_no_device_error_leaves_weight_and_adc_noise() -> None:
    stats = make_stats()
    for hw in (point(), point(wl_weight=9, cellBit=2, ADCprecision=7)):
        avg = stats.for_point(hw).model_average()
        k = np.arange(len(avg["var"]))
        weight = 4.0 ** (hw.cellBit * k)
        adc = avg["tiles"] * hw.subArray * avg["density"] ** 2 / (12 * 4.0**hw.ADCprecision)
        expected = (weight * avg["var"]).sum() / (1 / 12 + (weight * adc).sum())
        assert nipa_metric(stats, hw) == pytest.approx(expected, rel=1e-12)


def test_huge_adc_precision_leaves_weight_and_device_noise() -> None:
    stats = make_stats()
    for hw in (point(ADCprecision=24, vari=0.1),
               point(ADCprecision=24, vari_type="state_independent", ind_vari=0.05),
               point(ADCprecision=24, vari_type="laplace", laplace_b=0.12, SAF_prop=1e-3)):
        avg = stats.for_point(hw).model_average()
        weight = 4.0 ** np.arange(len(avg["var"]))
        sigma2 = device_variance(avg["var"], hw.vari_type, hw.device_spread, hw.SAF_prop)
        expected = (weight * avg["var"]).sum() / (1 / 12 + (weight * sigma2).sum())  # A_k -> 1
        assert nipa_metric(stats, hw) == pytest.approx(expected, rel=1e-6)
        assert nipa_metric(stats, dataclasses.replace(hw, ADCprecision=16)) < nipa_metric(stats, hw)


def test_monotonic_in_device_spread() -> None:
    stats = make_stats()
    for adc in (4, 6, 8):
        for field, vari_type in (("vari", "state_dependent"), ("laplace_b", "laplace"),
                                 ("ind_vari", "state_independent")):
            values = [nipa_metric(stats, point(ADCprecision=adc, vari_type=vari_type, **{field: spread}))
                      for spread in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
            # Non-increasing; equal only where a coarse ADC step absorbs a tiny error entirely
            # (A_k underflows to 0), and strictly lower over the whole range.
            assert all(a >= b for a, b in zip(values, values[1:], strict=False)), (adc, vari_type, values)
            assert values[-1] < values[2] < values[0], (adc, vari_type, values)


def test_monotonic_in_adc_bits() -> None:
    stats = make_stats()
    for extra in ({}, {"vari": 0.1}, {"vari": 0.3, "SAF_prop": 1e-2},
                  {"vari_type": "laplace", "laplace_b": 0.18},
                  {"vari_type": "state_independent", "ind_vari": 0.05}):
        for combo in ((8, 128, 1), (9, 128, 2), (7, 256, 2)):
            w, s, c = combo
            values = [nipa_metric(stats, point(wl_weight=w, subArray=s, cellBit=c, ADCprecision=a, **extra))
                      for a in range(2, 13)]
            assert all(a < b for a, b in zip(values, values[1:], strict=False)), (extra, combo, values)


def test_monotonic_in_stuck_at_faults() -> None:
    # With the SPEC's mixture 2p var_k + (1 - 2p) sigma^2, faults add noise whenever the variation's
    # own noise is below var_k (spreads under 1 for state_dependent; see README for the other case).
    stats = make_stats()
    for extra in ({}, {"vari": 0.2}, {"vari_type": "laplace", "laplace_b": 0.12}):
        values = [nipa_metric(stats, point(SAF_prop=p, **extra)) for p in (0.0, 1e-4, 1e-3, 1e-2, 0.1)]
        assert all(a > b for a, b in zip(values, values[1:], strict=False)), (extra, values)


def test_vectorized_equals_scalar_reference() -> None:
    stats = make_stats()
    points = random_points(300)
    many = nipa_metric(stats, points)
    per_layer = per_layer_nipa(stats, points)
    layer_sum = nipa_metric(stats, points, reduction="layer_sum")
    assert many.shape == (300,) and per_layer.shape == (300, len(LAYERS))
    for i, hw in enumerate(points):
        combo = stats.for_point(hw)
        avg = combo.model_average()
        signal, noise = reference_nipa(avg["var"], avg["density"], avg["tiles"], hw)
        assert many[i] == pytest.approx(signal / noise, rel=1e-9)
        assert nipa_metric(stats, hw) == pytest.approx(many[i], rel=1e-12)  # one point alone
        parts = [reference_nipa(combo.var[j], combo.density[j], combo.tiles[j], hw)
                 for j in range(len(LAYERS))]
        np.testing.assert_allclose(per_layer[i], [s / n for s, n in parts], rtol=1e-9)
        assert layer_sum[i] == pytest.approx(sum(s for s, _ in parts) / sum(n for _, n in parts), rel=1e-9)


def test_points_are_computed_in_one_vectorized_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = nipa.estimation.metric.nipa_terms

    def counting(*args, **kwargs):
        calls.append(np.shape(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(nipa.estimation.metric, "nipa_terms", counting)
    points = random_points(500, seed=1)
    values = nipa_metric(make_stats(), points)
    assert len(calls) == 1 and calls[0][0] == 500  # all points, all combinations, one array call
    assert values.shape == (500,) and np.all(np.isfinite(values)) and np.all(values > 0)


def test_model_average_is_the_default_and_layer_sum_differs() -> None:
    stats = make_stats()
    hw = point(vari=0.1)
    assert nipa_metric(stats, hw) == nipa_metric(stats, hw, reduction="model_average")
    assert nipa_metric(stats, hw, reduction="layer_sum") != pytest.approx(nipa_metric(stats, hw), rel=1e-6)
    one_layer = stats.for_point(hw)
    single = ComboStats(8, 128, 1, ("fc",), one_layer.var[2:], one_layer.density[2:], one_layer.mean_sq[2:],
                        one_layer.tiles[2:], one_layer.fan_in[2:], one_layer.weight_var[2:],
                        tile_range_ratio=one_layer.tile_range_ratio[2:])
    assert nipa_metric(single, hw, reduction="layer_sum") == pytest.approx(nipa_metric(single, hw), rel=1e-12)
    assert per_layer_nipa(single, hw)[0] == pytest.approx(nipa_metric(single, hw), rel=1e-12)


def test_per_layer_ranking_most_sensitive_first() -> None:
    stats = make_stats()
    hw = point(vari=0.1)
    ranking = rank_layers(stats, hw)
    values = per_layer_nipa(stats, hw)
    assert [name for name, _ in ranking] == [LAYERS[i] for i in np.argsort(values)]
    assert ranking[0][1] == min(values)


def test_tile_factor_option() -> None:
    stats = make_stats()
    hw = point(subArray=256)  # T = 1, 3, 2 for the three layers
    assert nipa_metric(stats, hw, tile_factor="one") > nipa_metric(stats, hw, tile_factor="tiles")
    with pytest.raises(ValueError, match="tile_factor"):
        nipa_metric(stats, hw, tile_factor="sqrt")


def test_errors_name_the_missing_statistics() -> None:
    stats = make_stats()
    with pytest.raises(KeyError, match="stat.py"):
        nipa_metric(stats, point(wl_weight=4))
    with pytest.raises(KeyError, match="w8_s128_c1 only"):
        nipa_metric(stats.get(8, 128, 1), [point(), point(subArray=256)])
    with pytest.raises(ValueError, match="reduction"):
        nipa_metric(stats, point(), reduction="mean")


def test_accepts_dicts_and_empty_lists() -> None:
    stats = make_stats()
    assert nipa_metric(stats, point().to_dict()) == nipa_metric(stats, point())
    assert nipa_metric(stats, []).shape == (0,)


def test_layer_slice_noise_matches_per_layer_nipa() -> None:
    stats = make_stats()
    hw = point(wl_weight=9, cellBit=2, ADCprecision=6, vari=0.1, SAF_prop=1e-3)
    combo = stats.for_point(hw)
    noise = layer_slice_noise(stats, hw)
    assert noise["total"].shape == combo.var.shape
    np.testing.assert_allclose(noise["total"], noise["adc"] + noise["device"])
    weight = 4.0 ** (2 * np.arange(combo.num_slices))
    expected = (weight * combo.var).sum(axis=1) / (1 / 12 + (weight * noise["total"]).sum(axis=1))
    np.testing.assert_allclose(per_layer_nipa(stats, hw), expected, rtol=1e-12)
    with pytest.raises(KeyError):
        layer_slice_noise(combo, point())


# ---- device_model="cells": the simulator's own cell model in expectation ---------------------------


@pytest.mark.parametrize("cell_bits", [1, 2])
@pytest.mark.parametrize("errors", [
    {"vari_type": "state_dependent", "vari": 0.2},
    {"vari_type": "laplace", "laplace_b": 0.15},
    {"vari_type": "state_independent", "ind_vari": 0.1},
    {"vari_type": "state_dependent", "vari": 0.0, "SAF_prop": 0.01},
    {"vari_type": "state_independent", "ind_vari": 0.05, "SAF_prop": 0.02},
    {"vari_type": "state_dependent", "vari": 0.1, "SAF_prop": 0.005, "onoffratio": 10.0},
])
def test_pair_variance_matches_monte_carlo_of_the_simulator(cell_bits: int, errors: dict) -> None:
    hw = HWConfig(wl_weight=7, cellBit=cell_bits, **errors)
    torch.manual_seed(0)
    q = torch.clamp(torch.round(torch.randn(400_000) * 16), -63, 63)
    slices = slice_magnitude(q, 7, cell_bits).double()  # [K, n] signed
    read = program_pairs(slices, hw, torch.Generator().manual_seed(1))
    squared_error = (read - slices) ** 2
    measured = squared_error.mean(dim=1).numpy()
    standard_error = (squared_error.std(dim=1) / squared_error.shape[1] ** 0.5).numpy()
    predicted = pair_device_variance((slices**2).mean(dim=1).numpy(), slices.abs().mean(dim=1).numpy(),
                                     hw.vari_type, hw.device_spread, hw.SAF_prop, cell_bits, hw.onoffratio)
    assert np.all(np.abs(predicted - measured) < 4 * standard_error + 1e-12), (predicted, measured)
    assert np.all(np.abs(predicted - measured) < 0.05 * measured)


def test_pair_variance_of_one_bit_faults_is_2p_whatever_the_slice():
    density = np.array([0.05, 0.3, 0.9])  # 1-bit cells: mean_sq = mean_abs = density
    got = pair_device_variance(density, density, "state_dependent", 0.0, 1e-3, 1, 1e8)
    np.testing.assert_allclose(got, 2e-3, rtol=1e-6)
    published = device_variance(density, "state_dependent", 0.0, 1e-3)
    assert np.all(published < got)  # the published form counts 2p var_k


def test_cells_device_model_in_the_metric():
    stats = make_stats()
    for combo in stats.combos.values():
        combo.mean_abs = combo.density * (1 + combo.cellBit) / 2
    clean = point()
    assert nipa_metric(stats, clean, device_model="cells") == nipa_metric(stats, clean)  # no device error
    faulty = point(SAF_prop=1e-3)
    assert nipa_metric(stats, faulty, device_model="cells") < nipa_metric(stats, faulty)
    # vectorized over points and layers = one point at a time, from each layer's own statistics
    points = [point(vari=v, SAF_prop=p, cellBit=c, wl_weight=w) for v in (0.0, 0.1) for p in (0.0, 1e-2)
              for c, w in ((1, 8), (2, 9))]
    many = nipa_metric(stats, points, device_model="cells")
    layers = per_layer_nipa(stats, points, device_model="cells")
    for i, hw in enumerate(points):
        assert nipa_metric(stats, hw, device_model="cells") == pytest.approx(many[i], rel=1e-12)
        noise = layer_slice_noise(stats, hw, device_model="cells")
        combo = stats.for_point(hw)
        significance = 4.0 ** (hw.cellBit * np.arange(combo.num_slices))
        expected = (significance * combo.var).sum(1) / (1 / 12 + (significance * noise["total"]).sum(1))
        np.testing.assert_allclose(layers[i], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="device_model"):
        nipa_metric(stats, clean, device_model="exact")


def test_cells_device_model_needs_mean_abs_only_for_multi_level_cells():
    stats = make_stats()  # synthetic statistics without mean_abs, as files of format 1
    assert np.isfinite(nipa_metric(stats, point(vari=0.1), device_model="cells"))  # 1-bit: mean_abs = density
    with pytest.raises(KeyError, match="stat.py --overwrite"):
        nipa_metric(stats, point(cellBit=2, wl_weight=9, vari=0.1), device_model="cells")
