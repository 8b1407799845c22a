"""validate.py and nipa.results.correlation: coefficients against hand-computed values and scipy, the seeded
bootstrap, grouping of chips into points (none dropped), and an end-to-end run on synthetic records
with statistics from the real stat pipeline, including the errors that name the missing command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

import validate
from nipa.estimation.metric import nipa_metric
from nipa.estimation.stats import model_statistics, save_statistics
from nipa.hardware.config import HWConfig
from nipa.results.correlation import (
    RecordsError,
    agreement,
    bootstrap_coefficients,
    group_records,
    one_factor_pairs,
    point_estimates,
    split_by,
)
from nipa.workloads.zoo import build_model

# ----------------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------------


def test_monotone_data_give_one_and_reversed_minus_one():
    x = np.arange(10.0)
    up = agreement(x, x**3, bootstrap=200, seed=1)
    down = agreement(x, -np.exp(x), bootstrap=200, seed=1)
    assert up.kendall.value == pytest.approx(1.0) and up.spearman.value == pytest.approx(1.0)
    assert down.kendall.value == pytest.approx(-1.0) and down.spearman.value == pytest.approx(-1.0)
    assert up.pearson.value < 1.0  # x^3 is monotone but not linear
    assert agreement(x, 2 * x + 1, bootstrap=0).pearson.value == pytest.approx(1.0)
    # every resample of monotone data is monotone: the interval collapses onto 1
    assert up.kendall.ci_low == pytest.approx(1.0) and up.kendall.ci_high == pytest.approx(1.0)


def test_small_example_by_hand_and_against_scipy():
    # x = 1..5, y = 1 3 2 5 4: 10 pairs, discordant (2,3) and (4,5) -> tau = (8 - 2) / 10 = 0.6;
    # rank differences d = 0 -1 1 -1 1 -> rho = 1 - 6 * 4 / (5 * 24) = 0.8
    x, y = [1, 2, 3, 4, 5], [1, 3, 2, 5, 4]
    result = point_estimates(x, y)
    assert result["kendall"].value == pytest.approx(0.6)
    assert result["spearman"].value == pytest.approx(0.8)
    assert result["pearson"].value == pytest.approx(0.8)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), np.round(rng.normal(size=40), 1)  # ties in b: tau-b
    result = point_estimates(a, b)
    assert result["kendall"].value == pytest.approx(sps.kendalltau(a, b).statistic)
    assert result["kendall"].p_value == pytest.approx(sps.kendalltau(a, b).pvalue)
    assert result["spearman"].p_value == pytest.approx(sps.spearmanr(a, b).pvalue)
    assert result["pearson"].value == pytest.approx(sps.pearsonr(a, b).statistic)


def test_vectorized_bootstrap_equals_scipy_on_each_resample():
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=30), 1)  # ties, and resamples duplicate points
    y = x + rng.normal(size=30)
    samples = bootstrap_coefficients(x, y, n_resamples=20, seed=7)
    index = np.random.default_rng(7).integers(0, 30, size=(20, 30))
    for i in range(20):
        xs, ys = x[index[i]], y[index[i]]
        assert samples["kendall"][i] == pytest.approx(sps.kendalltau(xs, ys).statistic, abs=1e-12)
        assert samples["spearman"][i] == pytest.approx(sps.spearmanr(xs, ys).statistic, abs=1e-12)
        assert samples["pearson"][i] == pytest.approx(sps.pearsonr(xs, ys).statistic, abs=1e-12)


def test_bootstrap_interval_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = x + 0.8 * rng.normal(size=60)
    first = agreement(x, y, bootstrap=500, seed=11)
    again = agreement(x, y, bootstrap=500, seed=11)
    other = agreement(x, y, bootstrap=500, seed=12)
    for name in ("kendall", "spearman", "pearson"):
        c = getattr(first, name)
        assert c.ci_low <= c.value <= c.ci_high
        assert (c.ci_low, c.ci_high) == (getattr(again, name).ci_low, getattr(again, name).ci_high)
    assert (first.kendall.ci_low, first.kendall.ci_high) != (other.kendall.ci_low, other.kendall.ci_high)
    assert first.to_dict()["seed"] == 11 and first.to_dict()["bootstrap"] == 500


def test_tiny_or_constant_groups_give_nan_not_an_error():
    for x, y in (([], []), ([1.0], [2.0]), ([1.0, 2.0], [2.0, 1.0]), ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])):
        result = agreement(x, y, bootstrap=100)
        assert result.n == len(x)
        assert math.isnan(result.kendall.value) and math.isnan(result.pearson.p_value)
        assert result.to_dict()["kendall"]["value"] is None  # NaN is written as JSON null
    with pytest.raises(ValueError, match="non-finite"):
        agreement([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------------------------------
# Records -> points
# ----------------------------------------------------------------------------------------------------

RUN = {"model": "smallcnn", "dataset": "digits", "seed": 0, "batch_size": 256, "limit": None, "exclude": [],
       "include": None, "per_read": False, "calib_batches": 4}


def record(config: HWConfig | None, chip: int | None, top1: float, run: dict | None = None,
           samples: int = 360, mapped=("conv1", "conv2", "conv3", "fc1", "fc2")) -> dict:
    base = {"model": "smallcnn", "dataset": "digits", "run": dict(run or RUN), "hw_file": "space.ini",
            "samples": samples, "top1": top1, "top5": min(100.0, top1 + 1)}
    if config is None:
        return {**base, "method": "ideal", "config": None, "config_key": None, "chip": None}
    return {**base, "method": "sliced", "config": config.to_dict(), "config_key": config.key(), "chip": chip,
            "mapped_layers": list(mapped)}


def test_grouping_averages_chips_and_keeps_every_point():
    a, b, c = HWConfig(wl_weight=8), HWConfig(wl_weight=4), HWConfig(wl_weight=4, vari=0.2)
    records = [record(None, None, 97.0), record(a, 0, 96.0), record(b, 0, 90.0), record(a, 1, 94.0),
               record(a, 2, 95.0), record(c, 1, 50.0), record(b, 1, 92.0), record(b, 1, 92.0)]
    grouped = group_records(records)
    # config-key order (whatever the record order), nothing dropped
    assert [p.config for p in grouped.points] == sorted([a, b, c], key=HWConfig.key) == [b, a, c]
    second, first, third = grouped.points
    assert first.chips == (0, 1, 2) and first.top1_mean == pytest.approx(95.0) and first.top1_std == 1.0
    assert second.num_chips == 2 and second.top1_mean == pytest.approx(91.0)
    assert third.num_chips == 1 and math.isnan(third.top1_std)  # a single chip is kept, std NaN
    assert grouped.ideal_top1 == 97.0 and grouped.duplicates == 1
    assert grouped.chip_counts() == {1: 1, 2: 1, 3: 1}
    assert "3 points" in grouped.describe_chips()
    assert split_by(grouped.points, "wl_weight") == {4: [0, 2], 8: [1]}


def test_equal_chip_means_are_ties():
    # in floats (96.0 + 96.1 + 96.6) / 3 != (96.0 + 96.3 + 96.4) / 3; a tie must stay a tie for tau-b
    a, b = HWConfig(ADCprecision=4), HWConfig(ADCprecision=5)
    grouped = group_records([record(a, i, v) for i, v in enumerate((96.0, 96.1, 96.6))]
                            + [record(b, i, v) for i, v in enumerate((96.0, 96.3, 96.4))])
    assert grouped.points[0].top1_mean == grouped.points[1].top1_mean


def test_grouping_rejects_mixed_runs_and_conflicting_chips():
    a = HWConfig()
    with pytest.raises(RecordsError, match="run settings.*batch_size"):
        group_records([record(a, 0, 90.0), record(a, 1, 91.0, run={**RUN, "batch_size": 64})])
    with pytest.raises(RecordsError, match="chip 0: two records"):
        group_records([record(a, 0, 90.0), record(a, 0, 80.0)])
    with pytest.raises(RecordsError, match="sample counts"):
        group_records([record(a, 0, 90.0), record(a, 1, 80.0, samples=100)])


def test_one_factor_pairs_count_only_single_parameter_differences():
    configs = [HWConfig(ADCprecision=8), HWConfig(ADCprecision=4), HWConfig(ADCprecision=4, vari=0.1),
               HWConfig(wl_weight=4, ADCprecision=8, vari=0.1)]
    counts = one_factor_pairs(configs, [3.0, 2.0, 1.0, 1.0], [90.0, 91.0, 80.0, 80.0],
                              ("ADCprecision", "vari", "wl_weight"))
    assert counts["ADCprecision"] == {"pairs": 1, "concordant": 0, "discordant": 1, "tied_x": 0, "tied_y": 0}
    assert counts["vari"]["pairs"] == 1 and counts["vari"]["concordant"] == 1
    assert counts["wl_weight"]["pairs"] == 0  # point 3 differs from every other in two parameters


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------

POINTS = [HWConfig(wl_weight=w, subArray=s, ADCprecision=a, cellBit=c, vari=v)
          for w, c in ((8, 1), (4, 1), (5, 2)) for s in (64, 128) for a in (7, 4) for v in (0.0, 0.2)]


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    """Statistics of a random-init smallcnn from the real pipeline, for every combination of POINTS."""
    torch.manual_seed(0)
    model = build_model("smallcnn", "digits").eval()
    combos = {(p.wl_weight, p.subArray, p.cellBit) for p in POINTS}
    stats = model_statistics(model, combos, model_name="smallcnn", dataset="digits",
                             metadata={"source": "test"})
    path = tmp_path_factory.mktemp("stats") / "smallcnn_digits.json"
    save_statistics(stats, path)
    return path, stats


def write_records(path, stats, chips=3, drop_last_chips=0):
    """Accuracy a monotone function of log2 NIPA plus small chip noise: tau must come out near 1."""
    values = np.log2(nipa_metric(stats, POINTS))
    rng = np.random.default_rng(0)
    lines = [record(None, None, 98.0)]
    for i, (point, value) in enumerate(zip(POINTS, values, strict=True)):
        n = chips - (1 if i < drop_last_chips else 0)
        for chip in range(n):
            top1 = float(np.clip(10 + 8 * value + rng.normal(0, 0.01), 0, 100))
            lines.append(record(point, chip, round(top1, 3)))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def args_for(tmp_path, stats_path, *extra):
    return ["--model_name", "smallcnn", "--dataset", "digits", "--records", str(tmp_path / "rec.jsonl"),
            "--stats", str(stats_path), "--out_dir", str(tmp_path / "out"), "--bootstrap", "200", *extra]


def test_end_to_end_writes_csv_png_json(tmp_path, stats_file, capsys):
    stats_path, stats = stats_file
    write_records(tmp_path / "rec.jsonl", stats, drop_last_chips=2)
    assert validate.main(args_for(tmp_path, stats_path, "--per_layer", "--color_by", "cellBit")) == 0
    printed = capsys.readouterr().out
    assert "24 points: 22 with 3 chips, 2 with 2 chips" in printed and "cellBit=2" in printed
    out = tmp_path / "out"
    import pandas as pd

    table = pd.read_csv(out / "digits_nipa_points.csv")
    assert len(table) == len(POINTS) and sorted(table["chips"].tolist()) == [2, 2] + [3] * 22  # rows in key order
    assert {"log2_nipa", "accuracy_mean", "accuracy_std", "noise_adc", "noise_device"} <= set(table.columns)
    assert (out / "digits_nipa.png").stat().st_size > 10_000
    summary = json.loads((out / "digits_nipa_summary.json").read_text())
    overall = summary["groups"][0]
    assert overall["group"] == "all" and overall["n"] == 24 and overall["chips"] == 70
    assert overall["kendall"]["value"] > 0.95 and overall["kendall"]["ci_low"] <= overall["kendall"]["value"]
    assert summary["metric"] == {"reduction": "model_average", "tile_factor": "tiles", "device_model": "published",
                                 "adc_term": "ground_truth", "published": False}
    assert {g["group"] for g in summary["groups"]} >= {"vari_type=state_dependent", "cellBit=1", "cellBit=2",
                                                       "wl_weight=5"}
    assert summary["ideal_top1"] == 98.0 and summary["nipa_version"]
    layers = pd.read_csv(out / "digits_nipa_layers.csv")
    assert sorted(layers["layer"]) == sorted(stats.layers) and layers["nipa"].is_monotonic_increasing

    # a variant never overwrites the published files
    assert validate.main(args_for(tmp_path, stats_path, "--reduction", "layer_sum", "--tile_factor", "one",
                                  "--no_plot", "--bootstrap", "0")) == 0
    variant = json.loads((out / "digits_nipa_layer_sum_tile-one_summary.json").read_text())
    assert variant["metric"]["published"] is False
    assert validate.main(args_for(tmp_path, stats_path, "--device_model", "cells", "--no_plot", "--bootstrap",
                                  "0")) == 0
    cells = pd.read_csv(out / "digits_nipa_device-cells_points.csv")
    assert cells["log2_nipa"].tolist() != table["log2_nipa"].tolist()  # the device term differs under variation
    clean = table["vari"] == 0
    np.testing.assert_allclose(cells["log2_nipa"][clean], table["log2_nipa"][clean], rtol=1e-12)
    assert json.loads((out / "digits_nipa_summary.json").read_text())["metric"]["adc_term"] == "ground_truth"
    # the published form (an ADC range per tile) writes its own files and differs on multi-tile points
    assert validate.main(args_for(tmp_path, stats_path, "--adc_term", "published", "--no_plot", "--bootstrap",
                                  "0")) == 0
    published = json.loads((out / "digits_nipa_adc-published_summary.json").read_text())
    assert published["metric"]["published"] is True
    published_table = pd.read_csv(out / "digits_nipa_adc-published_points.csv")
    assert (published_table["log2_nipa"] >= table["log2_nipa"] - 1e-12).all()  # a shared range only adds noise


def test_missing_inputs_name_the_command(tmp_path, stats_file, capsys):
    stats_path, stats = stats_file
    assert validate.main(args_for(tmp_path, stats_path)) == 2
    err = capsys.readouterr().err
    assert "python main.py --model_name smallcnn --dataset digits" in err and "--out" in err

    write_records(tmp_path / "rec.jsonl", stats)
    assert validate.main(args_for(tmp_path, tmp_path / "none.json")) == 2
    err = capsys.readouterr().err
    assert "python stat.py --model_name smallcnn --dataset digits --HWdes space.ini" in err

    partial = model_statistics(build_model("smallcnn", "digits"), [(8, 64, 1)], model_name="smallcnn",
                               dataset="digits")
    save_statistics(partial, tmp_path / "partial.json")
    assert validate.main(args_for(tmp_path, tmp_path / "partial.json")) == 2
    err = capsys.readouterr().err
    assert "lacks the statistics of" in err and "w4_s128_c1" in err
    assert "python stat.py --model_name smallcnn --dataset digits --wl_weight 4 5 8 --subArray 64 128" in err

    assert validate.main(args_for(tmp_path, stats_path, "--per_layer", "--point_index", "99")) == 2
    assert "--point_index 99" in capsys.readouterr().err


def test_records_of_different_runs_are_an_error(tmp_path, stats_file, capsys):
    stats_path, _ = stats_file
    lines = [record(POINTS[0], 0, 90.0), record(POINTS[1], 0, 80.0, run={**RUN, "per_read": True})]
    (tmp_path / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert validate.main(args_for(tmp_path, stats_path)) == 2
    assert "per_read" in capsys.readouterr().err


def test_chip_agreement_and_noise_ceiling():
    from nipa.results.correlation import chip_agreement, noise_ceiling

    configs = [HWConfig(ADCprecision=a) for a in (4, 5, 6, 7, 8)]
    exact = [record(c, chip, 90.0 + i) for i, c in enumerate(configs) for chip in range(3)]
    points = group_records(exact).points
    assert chip_agreement(points)["kendall_between_chips"] == pytest.approx(1.0)
    assert noise_ceiling(points)["kendall"] == pytest.approx(1.0)  # no chip noise: a perfect metric scores 1
    rng = np.random.default_rng(0)
    noisy = [record(c, chip, round(90.0 + 0.1 * i + rng.normal(0, 1.0), 2)) for i, c in enumerate(configs)
             for chip in range(3)]
    ceiling = noise_ceiling(group_records(noisy).points, n_draws=200, seed=1)
    assert ceiling["kendall"] < 0.9 and ceiling == noise_ceiling(group_records(noisy).points, n_draws=200, seed=1)
    assert noise_ceiling(group_records(noisy[::3]).points)["kendall"] is None  # one chip each: unknown


def test_chip_count_curve_estimates_the_tau_of_an_m_chip_sweep():
    from nipa.results.correlation import chip_count_curve

    rng = np.random.default_rng(0)
    true = np.linspace(90.0, 92.0, 20)  # the metric ranks the expected accuracies perfectly
    chips = [t + rng.normal(0, 1.0, 30) for t in true]
    curve = chip_count_curve(true, chips, draws=300, seed=2)
    assert curve["chips"] == [1, 2, 3, 5, 8, 10, 15, 20, 30]
    taus = dict(zip(curve["chips"], curve["kendall"], strict=True))
    assert taus[1] < taus[3] < taus[10] < taus[30]  # chip noise costs less as it is averaged
    # m = 3 drawn from 30 recorded chips: the same tau as sweeps that record only 3 fresh chips
    fresh = [sps.kendalltau(true, [np.mean(t + rng.normal(0, 1.0, 3)) for t in true])[0] for _ in range(2000)]
    assert taus[3] == pytest.approx(np.mean(fresh), abs=0.02)
    assert curve["doubling_from"] == 15 and curve["gain_last_doubling"] == pytest.approx(taus[30] - taus[15])
    assert curve == chip_count_curve(true, chips, draws=300, seed=2)  # seeded


def test_chip_count_curve_keeps_deterministic_points_and_stops_at_the_fewest_varying_chips():
    from nipa.results.correlation import chip_count_curve

    exact = [[90.0] * 3, [91.0] * 3]  # no device error: every chip the same
    assert chip_count_curve([1.0, 2.0, 3.0], exact + [[92.0] * 3]) is None
    noisy = exact + [[91.5, 92.5] * 5, [92.0, 93.0, 94.0] * 4]
    curve = chip_count_curve([1.0, 2.0, 3.0, 4.0], noisy, draws=50)
    assert curve["chips"][-1] == 10  # the point with 10 varying chips bounds the curve, not the one with 12
    assert curve["kendall"][-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 metric values but 4 points"):
        chip_count_curve([1.0, 2.0, 3.0], noisy)


def test_record_order_changes_no_reported_number():
    """One file or its shards, resumed in any order: the points (and so every bootstrap interval, which
    resamples by position) come out in config-key order."""
    configs = [HWConfig(wl_weight=w, vari=v) for w in (4, 6, 8) for v in (0.0, 0.1, 0.2)]
    rng = np.random.default_rng(0)
    records = [record(c, chip, float(rng.uniform(50, 99))) for c in configs for chip in range(2)]
    shuffled = [records[i] for i in rng.permutation(len(records))]
    one, other = group_records(records), group_records(shuffled)
    assert [p.key for p in one.points] == [p.key for p in other.points] == sorted(c.key() for c in configs)

    def interval(grouped):
        x = [math.log2(p.config.wl_weight + p.config.vari) for p in grouped.points]
        y = [sum(p.top1) / len(p.top1) for p in grouped.points]
        result = agreement(x, y, bootstrap=300, seed=0)
        return result.kendall.ci_low, result.kendall.ci_high, result.spearman.ci_low

    assert interval(one) == interval(other)


def test_perplexity_plot_takes_a_log_axis_and_chip_range_bars(tmp_path, monkeypatch) -> None:
    """Perplexity goes on a log axis with bars from the lowest to the highest chip (a std bar reaches below
    zero); chips written to 6 digits may round just past their mean, which must not make a bar negative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nipa.results.validation_report import plot_points

    rows = [{"ADCprecision": 6, "log2_nipa": 4.0, "perplexity_mean": 710.3733, "perplexity_std": 1110.0,
             "perplexity_chips": "89.5746 38.1199 2003.63"},
            {"ADCprecision": 8, "log2_nipa": 11.0, "perplexity_mean": 24.52907, "perplexity_std": 0.0,
             "perplexity_chips": "24.5291 24.5291 24.5291"}]  # rounded just above the mean
    coefficient = {"value": 1.0, "ci_low": None, "ci_high": None}
    overall = {"n": 2, "kendall": coefficient, "spearman": coefficient, "pearson": coefficient}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_points(rows, "ADCprecision", tmp_path / "p.png", "t", 20.0, overall, "perplexity")
    assert (tmp_path / "p.png").stat().st_size > 0
    axis = figures[0].axes[0]
    assert axis.get_yscale() == "log"
