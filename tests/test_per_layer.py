"""Per-layer hardware points (nipa.hardware.config.PerLayerConfig) through the simulator, the metric, the cost model,
the records and the per-layer search of explore.py --per_layer (nipa.pipelines.layer_search)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import explore
from nipa.errors import UserError
from nipa.estimation.metric import nipa_metric, per_layer_nipa
from nipa.estimation.stats import model_statistics
from nipa.hardware.config import ConfigError, HWConfig, PerLayerConfig, config_from_dict, layered, parse_layer_overrides
from nipa.hardware.cost import CostCoefficients, LayerShape, point_cost
from nipa.hardware.mapping import select_layers
from nipa.pipelines.layer_search import SearchOptions, search, search_nipa
from nipa.pipelines.sweep import SweepSettings, sweep_points
from nipa.simulator.crossbar import convert, crossbar_cores
from nipa.workloads.zoo import build_model

BASE = HWConfig(wl_weight=4, wl_input=6, subArray=64, ADCprecision=4, cellBit=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("smallcnn", "digits").eval()


@pytest.fixture(scope="module")
def layers(model):
    return select_layers(model)


@pytest.fixture(scope="module")
def stats(model):
    return model_statistics(model, [(w, s, 1) for w in (4, 5, 6) for s in (64, 128)])


def test_overrides_are_validated_naming_layer_field_and_value():
    with pytest.raises(ConfigError, match=r"'conv1'.*'vari' describes the whole chip"):
        layered(BASE, {"conv1": {"vari": 0.1}})
    with pytest.raises(ConfigError, match=r"'conv1'.*'foo' is not a hardware parameter"):
        layered(BASE, {"conv1": {"foo": 3}})
    with pytest.raises(ConfigError, match=r"'fc\*'.*ADCprecision=0"):
        layered(BASE, {"fc*": {"ADCprecision": 0}})
    with pytest.raises(ConfigError, match=r"'conv2'.*cellBit"):
        layered(BASE, {"conv2": {"cellBit": 4}})  # a 4-bit cell cannot slice 3 magnitude bits
    with pytest.raises(ConfigError, match="LAYER:FIELD=VALUE"):
        parse_layer_overrides(["conv1ADCprecision=7"])
    with pytest.raises(ConfigError, match="must be an integer"):
        parse_layer_overrides(["conv1:ADCprecision=7.5"])
    assert parse_layer_overrides(["conv1:ADCprecision=7,wl_weight=6"]) == {"conv1": {"ADCprecision": 7, "wl_weight": 6}}


def test_keys_records_and_read_through():
    point = layered(BASE, {"conv1": {"ADCprecision": 6}, "fc*": {"wl_weight": 6}})
    assert isinstance(point, PerLayerConfig)
    assert point.key() != BASE.key() and point.key().startswith(BASE.key())
    assert config_from_dict(point.to_dict()) == point  # what records store reads back as the same point
    assert layered(BASE, {"conv1": {"ADCprecision": 4}}) is BASE  # nothing differs: the uniform point itself
    assert point.for_layer("fc2").wl_weight == 6 and point.for_layer("conv1").ADCprecision == 6
    assert point.for_layer("conv2") == BASE
    assert point.has_device_error is False and point.adc_mode == BASE.adc_mode
    with pytest.raises(AttributeError, match="differs per layer"):
        _ = point.wl_weight
    settings = SweepSettings("smallcnn", "digits", "x.ini", points=[point])
    assert settings.signature()["per_layer"] is True
    assert "per_layer" not in SweepSettings("smallcnn", "digits", "x.ini", points=[BASE]).signature()
    with_overrides = SweepSettings("smallcnn", "digits", "x.ini", points=[BASE],
                                   layer_overrides={"fc2": {"ADCprecision": 7}})
    assert sweep_points(with_overrides) == [layered(BASE, {"fc2": {"ADCprecision": 7}})]


def test_convert_gives_each_layer_its_own_point(model, layers):
    point = layered(BASE, {"fc*": {"ADCprecision": 7, "wl_weight": 6}})
    converted = convert(model, point)
    configs = {core.name: core.hw for core in crossbar_cores(converted)}
    assert configs == {name: point.for_layer(name) for name in layers}
    assert configs["fc2"].ADCprecision == 7 and configs["conv1"] == BASE
    with pytest.raises(ConfigError, match="'fcx' matches no mapped layer"):
        convert(model, layered(BASE, {"fcx": {"ADCprecision": 7}}))
    # every layer overridden to another uniform point: the same outputs as that point
    other = HWConfig(wl_weight=6, wl_input=6, subArray=64, ADCprecision=7, cellBit=1)
    everywhere = layered(BASE, {"*": {"ADCprecision": 7, "wl_weight": 6}})
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(convert(model, everywhere)(x), convert(model, other)(x))
        assert not torch.allclose(convert(model, point)(x), convert(model, BASE)(x))


def test_metric_scores_each_layer_at_its_own_point(stats, layers):
    other = HWConfig(wl_weight=6, wl_input=6, subArray=128, ADCprecision=7, cellBit=1)
    everywhere = layered(BASE, {"*": {"ADCprecision": 7, "wl_weight": 6, "subArray": 128}})
    values = nipa_metric(stats, [other, everywhere], reduction="layer_sum")
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    one = layered(BASE, {layers[1]: {"ADCprecision": 7}})
    base_layers, one_layers = per_layer_nipa(stats, BASE), per_layer_nipa(stats, one)
    changed = np.flatnonzero(~np.isclose(base_layers, one_layers))
    assert changed.tolist() == [1] and one_layers[1] > base_layers[1]
    assert nipa_metric(stats, one, reduction="layer_sum") > nipa_metric(stats, BASE, reduction="layer_sum")
    with pytest.raises(UserError, match="layer_sum"):
        nipa_metric(stats, one)  # model_average averages statistics under one configuration


def test_cost_of_a_per_layer_point(layers):
    shapes = [LayerShape(name, 9 * (i + 1), 16, 64 // (i + 1)) for i, name in enumerate(layers)]
    other = HWConfig(wl_weight=6, wl_input=6, subArray=64, ADCprecision=7, cellBit=1)
    everywhere = layered(BASE, {"*": {"ADCprecision": 7, "wl_weight": 6}})
    expected = point_cost(shapes, other, 8, 256)["energy_nj"]
    assert point_cost(shapes, everywhere, 8, 256)["energy_nj"] == pytest.approx(expected)
    base = point_cost(shapes, BASE, 8, 256)
    raised = point_cost(shapes, layered(BASE, {layers[0]: {"ADCprecision": 7}}), 8, 256)
    assert raised["energy_nj"] > base["energy_nj"] and raised["area_mm2"] > base["area_mm2"]
    assert raised["energy_nj"] < point_cost(shapes, layered(BASE, {"*": {"ADCprecision": 7}}), 8, 256)["energy_nj"]


def test_search_spends_the_budget_where_nipa_gains(stats, layers):
    from nipa.hardware.config import SearchSpace

    space = SearchSpace({**{k: [v] for k, v in BASE.to_dict().items()}, "wl_weight": [4, 5, 6],
                         "ADCprecision": [4, 5, 6, 7]})
    shapes = [LayerShape(name, 9 * (i + 1), 16, 64 // (i + 1)) for i, name in enumerate(layers)]
    coefficients = CostCoefficients()
    start_cost = point_cost(shapes, BASE, 16, 256)["energy_nj"]
    options = SearchOptions(budget=start_cost * 1.1, fields=("ADCprecision", "wl_weight"))
    result = search(stats, shapes, space, BASE, options, coefficients)
    assert result.steps and result.cost["energy_nj"] <= options.budget
    assert all(step["gain"] > 0 for step in result.steps)
    assert result.nipa > search_nipa(stats, [BASE], options)[0]
    assert math.isclose(result.nipa, search_nipa(stats, [result.point], options)[0])
    with pytest.raises(UserError, match="above the budget"):
        search(stats, shapes, space, BASE, SearchOptions(budget=start_cost / 2), coefficients)


def test_script_runs_the_search(tmp_path: Path):
    out = tmp_path / "out"
    argv = ["--model_name", "smallcnn", "--dataset", "digits", "--random_init", "--out_dir", str(out),
            "--per_layer", "--per_layer_fields", "ADCprecision,wl_weight"]
    assert explore.main(argv) == 0
    summary = json.loads((out / "digits_explore_per_layer.json").read_text())
    assert summary["budgets"] and len(summary["rows"]) == len(summary["budgets"])
    for row in summary["rows"]:
        assert row["per_layer_cost"] <= row["budget"] and row["uniform_cost"] <= row["budget"]
        assert row["per_layer_log2_nipa"] >= row["start_log2_nipa"]
        assert row["per_layer_simulated"] is None  # --random_init: searched, not simulated
    assert explore.main(argv[:-2] + ["--per_layer_fields", "vari"]) == 2
