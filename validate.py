"""NIPA against the ground truth: does the metric rank hardware points as the slicing simulation does?

    python validate.py --model_name smallcnn --dataset mnist5k
    python validate.py --model_name smallcnn --dataset mnist5k --color_by ADCprecision --per_layer
    python validate.py --model_name smallcnn --dataset mnist5k --reduction layer_sum --tile_factor one

Reads the records main.py wrote (default results/{model}/{dataset}_accsim.jsonl, shards included) and
the bit statistics stat.py wrote (default results/stats/{model}_{dataset}.json), averages the chips of
every hardware point, computes NIPA per point and reports Kendall's tau-b, Spearman and Pearson between
log2(NIPA) and the accuracy, with p-values and seeded bootstrap confidence intervals, on all points and
per variation type, cellBit and weight bits. No point is dropped. Writes, in --out_dir (default
results/{model}/):

    {dataset}_nipa_points.csv     one row per point: its parameters, accuracy mean/std/chips, NIPA terms
    {dataset}_nipa.png            log2 NIPA against accuracy, coloured by --color_by; float accuracy line
    {dataset}_nipa_summary.json   every coefficient, p-value, interval and n, and the settings used
    {dataset}_nipa_layers.csv     with --per_layer: the layers ranked by sensitivity

A metric variant (--reduction / --tile_factor / --device_model other than the published defaults) inserts
its name into
the file names (e.g. {dataset}_nipa_layer_sum_points.csv), so it never overwrites the published form.

--measure loss or perplexity (an LLM's text task records no accuracy) judges NIPA against that instead and
inserts its name (e.g. {dataset}_nipa_perplexity_summary.json). Lower is better there, so the correlations
are computed against minus the measure: agreement is positive, as for accuracy (the summary says "sign": -1).
With top-1 (the headline, as in the paper) the test loss is reported beside it when the records hold it.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nipa import __version__
from nipa.cli import (
    add_debug_arg,
    add_text_window_args,
    add_user_data_args,
    add_user_model_args,
    resolve_model_args,
    run_main,
)
from nipa.compat import Compat
from nipa.config import HWConfig
from nipa.correlation import (
    COEFFICIENTS,
    Agreement,
    GroupedRecords,
    PointResult,
    RecordsError,
    agreement,
    chip_agreement,
    chip_count_curve,
    chip_mean,
    chip_std,
    group_records,
    measure_sign,
    noise_ceiling,
    one_factor_pairs,
    sign_note,
    split_by,
)
from nipa.data import DATASET_NAMES
from nipa.errors import UserError
from nipa.metric import (
    ADC_TERMS,
    DEVICE_MODELS,
    REDUCTIONS,
    TILE_FACTORS,
    VARI_CODE,
    adc_step,
    combo_device_variance,
    input_adc_factor,
    nipa_metric,
    per_layer_nipa,
    slice_noise_terms,
    weight_rounding_noise,
)
from nipa.records import read_records, sibling_files
from nipa.stats import ModelStats, check_stats_weights, combo_key, load_statistics
from nipa.zoo import dataset_id, model_id, results_path, statistics_path

# The metric's default form: the published one, except that the ADC term follows the ground truth's ADC
# mode (a range shared by the tiles in dynamic mode; nipa.metric.adc_step). Other values name the files.
DEFAULTS = {"reduction": "model_average", "tile_factor": "tiles", "device_model": "published",
            "adc_term": "ground_truth"}
PUBLISHED = {**DEFAULTS, "adc_term": "published"}
COLOR_FIELDS = ("wl_weight", "vari_type", "cellBit", "subArray", "ADCprecision", "device_spread")
GROUP_FIELDS = ("vari_type", "cellBit", "wl_weight", "subArray", "ADCprecision", "device_spread")
DEFAULT_GROUPS = ("vari_type", "cellBit", "wl_weight")
CONFIG_FIELDS = ("wl_weight", "wl_input", "subArray", "ADCprecision", "adc_mode", "cellBit", "onoffratio",
                 "vari_type", "vari", "ind_vari", "laplace_b", "SAF_prop")


class MissingInput(UserError):
    """Records or statistics that are not there; the message names the command that makes them."""


def default_stats_path(model_name: str, dataset: str) -> Path:
    """Where stat.py writes by default."""
    return statistics_path(model_name, dataset)


def default_results_path(model_name: str, dataset: str) -> Path:
    """Where main.py writes by default."""
    return results_path(model_name, dataset, "accsim")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # allow_abbrev=False: `--device cuda` (validate.py has no --device) must not be read as --device_model.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model_name", default="smallcnn",
                        help="a CNN (default smallcnn) or a causal LM, as given to main.py")
    parser.add_argument("--dataset", default="mnist5k",
                        help=f"CNN: one of {', '.join(DATASET_NAMES)}; LLM: the task given to main.py")
    parser.add_argument("--tasks", default=None, help="LLM: lm-eval task names (sets --dataset)")
    parser.add_argument("--records", default=None,
                        help="results JSONL of main.py (default results/{model}/{dataset}_accsim.jsonl)")
    parser.add_argument("--stats", default=None,
                        help="statistics JSON of stat.py (default results/stats/{model}_{dataset}.json)")
    parser.add_argument("--out_dir", default=None, help="where the CSV/PNG/JSON go (default results/{model}/)")
    parser.add_argument("--reduction", choices=REDUCTIONS, default=DEFAULTS["reduction"],
                        help="model_average (published: layer-averaged statistics in one formula) or "
                             "layer_sum (sum of per-layer signals over sum of per-layer noises)")
    parser.add_argument("--adc_term", choices=ADC_TERMS, default=DEFAULTS["adc_term"],
                        help="ADC step of the metric: ground_truth (default: as each point's ADC mode reads, "
                             "one range shared by a layer's tiles in dynamic mode) or published (S density_k "
                             "/ 2^a_r, a range per tile)")
    parser.add_argument("--tile_factor", choices=TILE_FACTORS, default=DEFAULTS["tile_factor"],
                        help="k_T of the ADC term: tiles (published, k_T = T) or one (k_T = 1)")
    parser.add_argument("--device_model", choices=DEVICE_MODELS, default=DEFAULTS["device_model"],
                        help="device term: published (sigma_dev,k^2 as the paper writes it) or cells (the "
                             "expected read error of the slice's differential pair under the simulator's "
                             "cell model; exact stuck-at faults, both cells' noise; see nipa/metric.py)")
    parser.add_argument("--accuracy", choices=("top1", "top5"), default="top1",
                        help="top1 (for an LLM's multiple-choice task: acc) or top5")
    parser.add_argument("--measure", choices=("top1", "top5", "loss", "perplexity"), default=None,
                        help="what the ground truth is judged by (default: --accuracy): loss (test cross-entropy) "
                             "or perplexity (an LLM's text task) are lower-is-better, so their correlations are "
                             "taken with minus the measure (agreement positive)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0 = no CIs)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--color_by", choices=COLOR_FIELDS, default="wl_weight")
    parser.add_argument("--group_by", nargs="*", choices=GROUP_FIELDS, default=list(DEFAULT_GROUPS),
                        help=f"parameters to report per value of (default: {' '.join(DEFAULT_GROUPS)})")
    parser.add_argument("--per_layer", action="store_true",
                        help="rank the layers by sensitivity (per-layer NIPA) at one point")
    parser.add_argument("--point_index", type=int, default=None,
                        help="with --per_layer: row of the points CSV (default: the median-NIPA point)")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG")
    noise = parser.add_argument_group("measured layer noise (--layer_noise; loads the model, runs the simulator)")
    noise.add_argument("--layer_noise", action="store_true",
                       help="also measure every mapped layer's noise on the recorded points' chips (one batch "
                            "of calibration data through the float and the crossbar layer) and report how NIPA "
                            "ranks it: a check of the metric that does not go through the accuracy")
    noise.add_argument("--layer_noise_chips", type=int, default=3,
                       help="chips per point (chips 0, 1, ... of the ground truth's seed)")
    noise.add_argument("--layer_noise_batch", type=int, default=None,
                       help="inputs in the batch (default: 256 images for a CNN, 16 sequences for an LLM)")
    noise.add_argument("--ckpt_dir", default="ckpts")
    noise.add_argument("--ckpt", default=None, help="checkpoint (default: ckpts/{model}_{dataset}.pt)")
    noise.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    add_text_window_args(parser)
    add_user_model_args(parser)
    add_user_data_args(parser)
    add_debug_arg(parser)
    args = resolve_model_args(parser, parser.parse_args(argv))
    if args.measure is not None and args.accuracy != "top1" and args.measure != args.accuracy:
        parser.error(f"--accuracy {args.accuracy} and --measure {args.measure}: give one of them")
    args.measure = args.measure or args.accuracy
    if args.measure in ("top1", "top5"):
        args.accuracy = args.measure
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if not 0 < args.confidence < 1:
        parser.error("--confidence must lie in (0, 1)")
    if args.layer_noise_chips < 1:
        parser.error("--layer_noise_chips must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------
# Inputs, with errors that name the command that makes what is missing
# ----------------------------------------------------------------------------------------------------


def _command(script: str, options: Sequence[tuple[str, Any]]) -> str:
    words = ["python", script]
    for name, value in options:
        if value is None or value is False:
            continue
        words.append(name)
        if value is not True:
            words.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return " ".join(shlex.quote(w) for w in words)


def main_command(args: argparse.Namespace, records_path: Path) -> str:
    """The main.py command line that writes the records validate.py looks for."""
    custom = records_path != default_results_path(args.model_name, args.dataset)
    return _command("main.py", [("--model_name", args.model_name), ("--dataset", args.dataset),
                                ("--HWdes", "HW_config/Search_space.ini"), ("--sample_num", 0),
                                ("--cycle", 3), ("--out", str(records_path) if custom else None)])


def stat_command(args: argparse.Namespace, stats_path: Path, grouped: GroupedRecords | None,
                 combos: Sequence[tuple[int, int, int]] | None = None) -> str:
    """The stat.py command line for the records' INI files (or for some combinations), with the layer
    selection the simulation used and the output path validate.py reads."""
    run = (grouped.run if grouped else None) or {}
    options: list[tuple[str, Any]] = [("--model_name", args.model_name), ("--dataset", args.dataset)]
    if combos:
        options += [("--wl_weight", sorted({c[0] for c in combos})), ("--subArray", sorted({c[1] for c in combos})),
                    ("--cellbit", sorted({c[2] for c in combos}))]
    else:
        options.append(("--HWdes", (grouped.hw_files if grouped and grouped.hw_files else None)
                        or ["HW_config/Search_space.ini"]))
    options += [("--exclude_layer", run.get("exclude") or None), ("--include_layer", run.get("include")),
                ("--out", None if stats_path == default_stats_path(args.model_name, args.dataset)
                 else str(stats_path))]
    return _command("stat.py", options)


def load_inputs(args: argparse.Namespace) -> tuple[GroupedRecords, ModelStats, Path, Path]:
    """Records grouped per point, and statistics that cover every recorded point (or MissingInput)."""
    records_path = Path(args.records) if args.records else default_results_path(args.model_name, args.dataset)
    stats_path = Path(args.stats) if args.stats else default_stats_path(args.model_name, args.dataset)
    if not sibling_files(records_path):
        raise MissingInput(f"no simulation records at {records_path} (nor shards of it). Make them with:\n  "
                           + main_command(args, records_path))
    grouped = group_records(read_records(records_path), measure=getattr(args, "measure", "top1"))
    if not grouped.points:
        raise MissingInput(f"{records_path} holds no simulated hardware point (method 'sliced') yet. "
                           f"Make them with:\n  {main_command(args, records_path)}")
    names = (("model", model_id(args.model_name)), ("dataset", dataset_id(args.model_name, args.dataset)))
    for name, wanted in names:
        if grouped.__dict__[name] not in (None, wanted):
            raise RecordsError(f"{records_path} holds records of {name} {grouped.__dict__[name]!r}, not "
                               f"{wanted!r}")
    if not stats_path.is_file():
        raise MissingInput(f"no bit statistics at {stats_path}. Make them with:\n  "
                           + stat_command(args, stats_path, grouped))
    stats = load_statistics(stats_path)
    check_stats_weights(stats, (grouped.run or {}).get("weights"), stats_path,
                        lambda note: print(note, file=sys.stderr))
    for name, wanted in names:
        have = stats.meta.get(name)
        if have not in (None, "", wanted):
            raise MissingInput(f"{stats_path} holds statistics of {name} {have!r}, not {wanted!r}. Make the "
                               f"right ones with:\n  {stat_command(args, stats_path, grouped)}")
    if grouped.mapped_layers is not None and list(stats.layers) != grouped.mapped_layers:
        raise MissingInput(f"{stats_path} describes layers {list(stats.layers)} but the simulation mapped "
                           f"{grouped.mapped_layers}. Recompute them with the simulation's layer selection:\n  "
                           + stat_command(args, stats_path, grouped))
    needed = {(p.config.wl_weight, p.config.subArray, p.config.cellBit) for p in grouped.points}
    missing = sorted(c for c in needed if combo_key(*c) not in stats.combos)
    if missing:
        raise MissingInput(f"{stats_path} lacks the statistics of {', '.join(combo_key(*c) for c in missing)} "
                           f"needed by recorded points. Add them with:\n  "
                           + stat_command(args, stats_path, grouped, missing))
    return grouped, stats, records_path, stats_path


# ----------------------------------------------------------------------------------------------------
# The metric per point, with its terms
# ----------------------------------------------------------------------------------------------------


def noise_breakdown(stats: ModelStats, config: HWConfig, reduction: str = "model_average",
                    tile_factor: str = "tiles", device_model: str = "published",
                    adc_term: str = "ground_truth") -> dict[str, float]:
    """Signal and the three noise terms (weight rounding Q, ADC, device) of one point, in LSB^2, summed
    over slices with their 4^(c k) weights (and over layers for layer_sum), so NIPA = signal / (q + adc
    + device). For diagnosis: which term decides a point's NIPA."""
    combo = stats.for_point(config)
    if reduction == "model_average":
        avg = combo.model_average()
        var, density = np.asarray(avg["var"])[None], np.asarray(avg["density"])[None]
        tiles, weight_var = np.array([avg["tiles"]]), np.array([avg["weight_var"]])
        ratio = None if avg["tile_range_ratio"] is None else np.asarray(avg["tile_range_ratio"])[None]
    else:
        var, density, tiles, weight_var = combo.var, combo.density, combo.tiles.astype(float), combo.weight_var
        ratio = combo.tile_range_ratio
    if tile_factor == "one":
        tiles = np.ones_like(tiles)
    sigma2 = combo_device_variance(combo, config, device_model, model_average=reduction == "model_average")
    significance = 4.0 ** (config.cellBit * np.arange(var.shape[1]))
    delta = None if adc_term == "published" else adc_step(density, config.subArray, config.ADCprecision,
                                                          config.cellBit, config.adc_mode, ratio)
    if adc_term == "input_bits":  # nipa.metric.input_adc_factor scales ADC_k, i.e. delta^2
        delta = delta * np.sqrt(input_adc_factor(config.wl_input))
    adc, device = slice_noise_terms(var, density, tiles, config.subArray, config.ADCprecision,
                                    VARI_CODE[config.vari_type], config.device_spread, config.SAF_prop, sigma2,
                                    delta)
    return {"signal": float((significance * var).sum()),
            "noise_q": float(weight_rounding_noise(weight_var, config.wl_weight).sum()),
            "noise_adc": float((significance * adc).sum()),
            "noise_device": float((significance * device).sum())}


def chip_accuracies(point: PointResult, accuracy: str) -> list[float]:
    """The per-chip values of a point's measure (top1, top5, loss, perplexity) that were recorded (top-5 may
    be missing for a task)."""
    return point.values(accuracy)


def measure_column(measure: str) -> str:
    """The points-table column prefix of a measure: accuracy_* for top1/top5 (as always), else loss_*,
    perplexity_*."""
    return "accuracy" if measure in ("top1", "top5") else measure


def measure_y(rows: list[dict[str, Any]], measure: str) -> np.ndarray:
    """The y of every correlation: the chip-mean measure, times -1 for loss and perplexity (agreement > 0)."""
    return measure_sign(measure) * np.array([r[f"{measure_column(measure)}_mean"] for r in rows], dtype=float)


def _lower_is_better_columns(point: PointResult) -> dict[str, Any]:
    """loss_* and perplexity_* columns of the measures the point's records hold."""
    columns: dict[str, Any] = {}
    for name in ("loss", "perplexity"):
        values = point.values(name)
        if values:
            columns.update({f"{name}_mean": chip_mean(values), f"{name}_std": chip_std(values),
                            f"{name}_chips": " ".join(f"{v:g}" for v in values)})
    return columns


def point_table(grouped: GroupedRecords, stats: ModelStats, reduction: str, tile_factor: str,
                accuracy: str = "top1", device_model: str = "published",
                adc_term: str = "ground_truth") -> list[dict[str, Any]]:
    """One row per point: parameters, accuracy over chips, NIPA, log2 NIPA and its terms."""
    configs = [p.config for p in grouped.points]
    values = np.atleast_1d(nipa_metric(stats, configs, reduction=reduction, tile_factor=tile_factor,
                                       device_model=device_model, adc_term=adc_term))
    rows = []
    for index, (point, value) in enumerate(zip(grouped.points, values, strict=True)):
        terms = noise_breakdown(stats, point.config, reduction, tile_factor, device_model, adc_term)
        recombined = terms["signal"] / (terms["noise_q"] + terms["noise_adc"] + terms["noise_device"])
        if not math.isclose(recombined, value, rel_tol=1e-9):  # the breakdown must describe the metric
            raise AssertionError(f"noise breakdown {recombined} != NIPA {value} at {point.config.describe()}")
        config = point.config.to_dict()
        finite = chip_accuracies(point, accuracy if accuracy in ("top1", "top5") else "top1")
        rows.append({
            "index": index, **{name: config[name] for name in CONFIG_FIELDS},
            "device_spread": point.config.device_spread, "hw_file": point.hw_file,
            "chips": point.num_chips, "chip_ids": " ".join(map(str, point.chips)),
            "accuracy_mean": chip_mean(finite),
            "accuracy_std": chip_std(finite),
            "accuracy_chips": " ".join(f"{v:g}" for v in finite),
            "top1_mean": point.top1_mean, "top5_mean": point.top5_mean, "samples": point.samples,
            **_lower_is_better_columns(point),
            "nipa": float(value), "log2_nipa": float(np.log2(value)), **terms,
            # which error the metric blames most at this point (q: weight rounding)
            "dominant_term": max(("q", "adc", "device"), key=lambda name: terms[f"noise_{name}"]),
        })
    return rows


# ----------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------


def format_chip_curve(curve: dict[str, Any]) -> str:
    """Kendall's tau against the chips per point (is the ground truth converged?)."""
    steps = ", ".join(f"{m}: {t:.3f}" for m, t in zip(curve["chips"], curve["kendall"], strict=True) if t is not None)
    text = f"Kendall tau-b with m chips per point (mean over {curve['draws']} draws of m chips): {steps}"
    if curve["gain_last_doubling"] is not None:
        text += (f"\n  from {curve['doubling_from']} to {curve['chips'][-1]} chips tau moved "
                 f"{curve['gain_last_doubling']:+.3f}: more chips per point "
                 + ("would still change it" if abs(curve["gain_last_doubling"]) >= 0.01 else "would barely change it"))
    return text


def group_agreements(rows: list[dict[str, Any]], grouped: GroupedRecords, group_by: Sequence[str],
                     bootstrap: int, seed: int, confidence: float, measure: str = "top1") -> list[dict[str, Any]]:
    """Agreement on all points, then per value of every `group_by` parameter (every group, however
    small: n < 3 is reported with NaN); against minus the measure for loss and perplexity."""
    x = np.array([r["log2_nipa"] for r in rows])
    y = measure_y(rows, measure)

    def entry(label: str, by: str | None, value: Any, index: list[int]) -> dict[str, Any]:
        result: Agreement = agreement(x[index], y[index], bootstrap=bootstrap, seed=seed, confidence=confidence)
        return {"group": label, "by": by, "value": value, "chips": int(sum(rows[i]["chips"] for i in index)),
                **result.to_dict()}

    results = [entry("all", None, None, list(range(len(rows))))]
    for by in group_by:
        for value, index in split_by(grouped.points, by).items():
            results.append(entry(f"{by}={value}", by, value, index))
    return results


def _fmt(coefficient: dict[str, Any]) -> str:
    """'+0.812 [+0.75,+0.86]  1.2e-30': value, bootstrap interval, p-value (31 characters)."""
    value, low, high = coefficient["value"], coefficient["ci_low"], coefficient["ci_high"]
    if value is None:
        return f"{'nan':<31}"
    ci = f"[{low:+.2f},{high:+.2f}]" if low is not None and high is not None else ""
    return f"{value:+.3f} {ci:<15} {coefficient['p_value']:8.1e}"


def format_groups(groups: list[dict[str, Any]], confidence: float) -> str:
    """The printed table: one line per group, each coefficient with its interval and p-value."""
    level = f"{100 * confidence:g}%"
    head = f"{'group':<26} {'n':>4} {'chips':>5}  " + "   ".join(
        f"{name + ' [' + level + ' CI] p':<31}" for name in ("Kendall tau-b", "Spearman", "Pearson"))
    lines = [head]
    for g in groups:
        lines.append(f"{g['group']:<26} {g['n']:>4} {g['chips']:>5}  " + "   ".join(_fmt(g[c]) for c in COEFFICIENTS))
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd  # imported here: only the writers need it

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.10g")


def plot_points(rows: list[dict[str, Any]], color_by: str, path: Path, title: str, ideal: float | None,
                overall: dict[str, Any], accuracy: str = "top1") -> None:
    """Scatter of log2 NIPA (x) against the chip-mean accuracy (y, bars: std over chips), coloured by one
    parameter, with the float model's accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    values = sorted({r[color_by] for r in rows}, key=lambda v: (str(type(v)), v))
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "viridis")
    fig, ax = plt.subplots(figsize=(9.0, 5.4), dpi=130)
    for i, value in enumerate(values):
        chosen = [r for r in rows if r[color_by] == value]
        color = cmap(i % 10) if len(values) <= 10 else cmap(i / max(1, len(values) - 1))
        column = measure_column(accuracy)
        xs = [r["log2_nipa"] for r in chosen]
        ys = [r[f"{column}_mean"] for r in chosen]
        errs = [0.0 if math.isnan(r[f"{column}_std"]) else r[f"{column}_std"] for r in chosen]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", ms=5, color=color, ecolor=color, elinewidth=0.8, capsize=2,
                    alpha=0.85, label=f"{value} ({len(chosen)})")
    unit = "%" if accuracy in ("top1", "top5") else ""
    if ideal is not None:
        ax.axhline(ideal, color="0.3", ls="--", lw=1, label=f"float model {ideal:.2f}{unit}")
    ax.set_xlabel("log2(NIPA)")
    ax.set_ylabel(f"simulated {accuracy} accuracy (%), mean over chips" if unit else
                  f"simulated {accuracy} (lower is better), mean over chips")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    # legend and coefficients beside the axes: inside they would hide points wherever they went
    ax.legend(title=color_by, fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))

    def show(name: str, symbol: str) -> str:
        c = overall[name]
        if c["value"] is None:
            return f"{symbol} = nan"
        ci = f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c["ci_low"] is not None else ""
        return f"{symbol} = {c['value']:.3f}{ci}"

    text = "\n".join([f"n = {overall['n']} points", show("kendall", "Kendall τ"), show("spearman", "Spearman ρ"),
                      show("pearson", "Pearson r")] + ([] if unit else [f"(against -{accuracy})"]))
    ax.text(1.02, 0.0, text, transform=ax.transAxes, va="bottom", ha="left", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def layer_ranking(stats: ModelStats, rows: list[dict[str, Any]], configs: list[HWConfig], index: int,
                  tile_factor: str, device_model: str = "published",
                  adc_term: str = "ground_truth") -> list[dict[str, Any]]:
    """Layers at point `index`, most sensitive (lowest per-layer NIPA) first, with each layer's mean
    rank over all points (1 = most sensitive) and how often it is the most sensitive."""
    every = np.atleast_2d(per_layer_nipa(stats, configs, tile_factor=tile_factor, device_model=device_model,
                                         adc_term=adc_term))
    ranks = every.argsort(axis=1).argsort(axis=1) + 1
    at = every[index]
    order = np.argsort(at, kind="stable")
    return [{"rank": position + 1, "layer": stats.layers[layer], "nipa": float(at[layer]),
             "log2_nipa": float(np.log2(at[layer])), "mean_rank_all_points": float(ranks[:, layer].mean()),
             "most_sensitive_at_points": int((ranks[:, layer] == 1).sum())}
            for position, layer in enumerate(order)]


def representative_index(rows: list[dict[str, Any]], point_index: int | None) -> int:
    """--point_index, or the point with the median NIPA (the lower middle one for an even count)."""
    if point_index is not None:
        if not 0 <= point_index < len(rows):
            raise UserError(f"--point_index {point_index}: there are {len(rows)} points (0..{len(rows) - 1})")
        return point_index
    order = np.argsort([r["log2_nipa"] for r in rows], kind="stable")
    return int(order[(len(rows) - 1) // 2])


def describe_row(row: dict[str, Any]) -> str:
    config = HWConfig.from_dict({name: row[name] for name in CONFIG_FIELDS})
    return config.describe()


def layer_noise_check(args: argparse.Namespace, grouped: GroupedRecords, stats: ModelStats,
                      rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure every mapped layer's noise at every recorded point (nipa.layer_noise), add it to `rows`,
    and compare: per-layer NIPA with the measured per-layer SNR, model-level NIPA with the measured SNR
    averaged over layers, and that measured SNR with the accuracy."""
    from nipa.layer_noise import measure_layer_noise
    from nipa.workload import Workload

    run = grouped.run or {}
    workload = Workload.from_args(args)
    workload.seed = int(run.get("seed", 0))  # a --split permutation is the ground truth's
    model, _, data = workload.load(batch_size=args.layer_noise_batch)
    batch = workload.calibration_inputs(data, 1, batch_size=args.layer_noise_batch, seed=int(run.get("seed", 0)))[0]
    configs = [p.config for p in grouped.points]
    layers, noise = measure_layer_noise(model, configs, batch, chips=args.layer_noise_chips,
                                        seed=int(run.get("seed", 0)), exclude=run.get("exclude") or (),
                                        include=run.get("include"), per_read=bool(run.get("per_read", False)),
                                        compat=Compat(**{name: True for name in run.get("compat", [])}))
    if list(layers) != list(stats.layers):
        raise RecordsError(f"the measured layers {layers} are not the statistics' layers {list(stats.layers)}")
    measured = -np.log2(noise)  # [N, L] per-layer measured log2 SNR
    model_level = -np.log2(noise.mean(axis=1))
    for row, values, overall in zip(rows, measured, model_level, strict=True):
        row["measured_log2_snr"] = float(overall)
        row.update({f"measured_log2_snr_{name}": float(v) for name, v in zip(layers, values, strict=True)})
    predicted = np.log2(np.atleast_2d(per_layer_nipa(stats, configs, tile_factor=args.tile_factor,
                                                     device_model=args.device_model, adc_term=args.adc_term)))
    x = np.array([r["log2_nipa"] for r in rows])
    y = measure_y(rows, getattr(args, "measure", "top1"))
    options = {"bootstrap": args.bootstrap, "seed": args.seed, "confidence": args.confidence}
    return {
        "inputs": int(batch.shape[0]), "chips": args.layer_noise_chips,
        "nipa_vs_measured": agreement(x, model_level, **options).to_dict(),
        "per_layer_nipa_vs_measured": {name: agreement(predicted[:, j], measured[:, j], **options).to_dict()
                                       for j, name in enumerate(layers)},
        "measured_vs_accuracy": agreement(model_level, y, **options).to_dict(),
    }


def format_layer_noise(check: dict[str, Any]) -> str:
    """The printed lines of --layer_noise."""
    labels = [("log2 NIPA vs measured SNR (layer mean)", check["nipa_vs_measured"])]
    labels += [(f"  per-layer NIPA vs measured SNR, {name}", result)
               for name, result in check["per_layer_nipa_vs_measured"].items()]
    labels.append(("measured SNR vs accuracy", check["measured_vs_accuracy"]))
    width = max(len(label) for label, _ in labels)
    head = (f"measured layer noise ({check['inputs']} calibration inputs, up to {check['chips']} chips per "
            "point): Kendall tau-b [CI] p")
    return "\n".join([head] + [f"  {label:<{width}} {_fmt(result['kendall'])}" for label, result in labels])


# ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything validate.py does; returns the summary that is also written as JSON."""
    grouped, stats, records_path, stats_path = load_inputs(args)
    published = all(getattr(args, name) == value for name, value in PUBLISHED.items())
    default = all(getattr(args, name) == value for name, value in DEFAULTS.items())
    variant = "" if default else "_" + "_".join(
        part for part in (args.reduction if args.reduction != DEFAULTS["reduction"] else "",
                          f"tile-{args.tile_factor}" if args.tile_factor != DEFAULTS["tile_factor"] else "",
                          f"device-{args.device_model}" if args.device_model != DEFAULTS["device_model"] else "",
                          f"adc-{args.adc_term}" if args.adc_term != DEFAULTS["adc_term"] else "")
        if part)
    out_dir = Path(args.out_dir) if args.out_dir else Path("results") / model_id(args.model_name)
    measure = getattr(args, "measure", args.accuracy)
    lower = measure_sign(measure) < 0
    # A lower-is-better measure names its files; top-1 and top-5 keep the files they always had.
    stem = out_dir / f"{dataset_id(args.model_name, args.dataset)}_nipa{variant}{'_' + measure if lower else ''}"
    paths = {"points_csv": Path(f"{stem}_points.csv"), "plot_png": Path(f"{stem}.png"),
             "summary_json": Path(f"{stem}_summary.json")}

    source = str(stats.meta.get("source", ""))
    if source.startswith("random_init"):
        warnings.warn(f"{stats_path}: statistics of untrained weights ({source})", stacklevel=1)
    rows = point_table(grouped, stats, args.reduction, args.tile_factor, measure, args.device_model,
                       args.adc_term)
    groups = group_agreements(rows, grouped, args.group_by, args.bootstrap, args.seed, args.confidence, measure)
    x = np.array([r["log2_nipa"] for r in rows])
    y = measure_y(rows, measure)
    pairs = one_factor_pairs([p.config for p in grouped.points], x, y, GROUP_FIELDS + ("vari", "ind_vari",
                                                                                        "laplace_b", "SAF_prop"))

    reliability = chip_agreement(grouped.points, measure)
    ceiling = noise_ceiling(grouped.points, seed=args.seed, measure=measure) if measure != "top5" else None
    sign = measure_sign(measure)
    curve = chip_count_curve(x, [[sign * v for v in chip_accuracies(p, measure)] for p in grouped.points],
                             seed=args.seed)
    # The test loss beside top-1 (CNNs, multiple-choice tasks): a continuous second measure, all points only.
    loss_check = None
    if not lower and all(p.values("loss") for p in grouped.points):
        loss_groups = group_agreements(rows, grouped, (), args.bootstrap, args.seed, args.confidence, "loss")
        loss_check = {"measure": "loss", "sign": -1, "note": sign_note("loss"), "ideal": grouped.ideal_loss,
                      "y": "mean loss over chips (nats)", "groups": loss_groups}
    metric_name = (f"NIPA {args.reduction}/k_T={args.tile_factor}/device={args.device_model}/adc={args.adc_term}"
                   + (" (published)" if published else " (default)" if default else " (variant)"))
    print(f"{args.model_name} on {args.dataset}: {grouped.describe_chips()} from {records_path}"
          + (f" ({grouped.duplicates} repeated chip records counted once)" if grouped.duplicates else ""))
    if grouped.ideal_top1 is not None:
        print(f"float model {args.accuracy if args.accuracy == 'top1' else 'top1'}: {grouped.ideal_top1:.2f}%")
    if lower and grouped.ideal(measure) is not None:
        print(f"float model {measure}: {grouped.ideal(measure):.4f}")
    print(f"{metric_name}, statistics {stats_path}; log2(NIPA) vs mean {measure} over chips; "
          f"{args.bootstrap} bootstrap resamples (seed {args.seed})")
    if lower:
        print(f"sign -1: {sign_note(measure)}")
    print(format_groups(groups, args.confidence))
    if loss_check is not None:
        print(f"test loss beside {measure} (sign -1, against -loss; agreement positive): Kendall tau-b [CI] p "
              f"{_fmt(loss_check['groups'][0]['kendall'])}  Pearson {_fmt(loss_check['groups'][0]['pearson'])}")
    if reliability["kendall_between_chips"] is not None:
        between = reliability["kendall_between_chips"]
        print(f"ground truth against itself: Kendall tau-b between two chips {between:+.3f} "
              f"(mean over {reliability['chip_pairs']} chip pairs)")
    if ceiling and ceiling["kendall"] is not None:
        print(f"noise ceiling: a perfect ranking would score Kendall tau-b about {ceiling['kendall']:.3f} against "
              f"these chip means (chip std, median {ceiling['median_chip_std']:.2f}"
              f"{' points' if not lower else ''}; rough, see README)")
    if curve:
        print(format_chip_curve(curve))
    print("pairs of points differing in one parameter only (concordant / discordant / tied in NIPA / "
          f"tied in {'accuracy' if not lower else measure}):")
    for name, count in pairs.items():
        if count["pairs"]:
            print(f"  {name:<14} {count['pairs']:>5} pairs: {count['concordant']:>5} / {count['discordant']:>5} / "
                  f"{count['tied_x']:>5} / {count['tied_y']:>5}")

    check = None
    if args.layer_noise:
        check = layer_noise_check(args, grouped, stats, rows)
        print(format_layer_noise(check))

    write_csv(rows, paths["points_csv"])
    overall = groups[0]
    if not args.no_plot:
        title = (f"{args.model_name} on {args.dataset}: {metric_name}\n{grouped.describe_chips()}")
        plot_points(rows, args.color_by, paths["plot_png"], title, grouped.ideal(measure), overall, measure)
    else:
        paths.pop("plot_png")

    layers = None
    if args.per_layer:
        index = representative_index(rows, args.point_index)
        layers = layer_ranking(stats, rows, [p.config for p in grouped.points], index, args.tile_factor,
                               args.device_model, args.adc_term)
        paths["layers_csv"] = Path(f"{stem}_layers.csv")
        write_csv(layers, paths["layers_csv"])
        print(f"layers by sensitivity at point {index} ({describe_row(rows[index])}, log2 NIPA "
              f"{rows[index]['log2_nipa']:.2f}, {measure} {rows[index][measure_column(measure) + '_mean']:.2f}"
              f"{'' if lower else '%'}); "
              f"most sensitive (lowest per-layer NIPA) first:")
        print(f"  {'rank':>4} {'layer':<30} {'log2 NIPA':>9} {'mean rank, all points':>22}")
        for layer in layers:
            print(f"  {layer['rank']:>4} {layer['layer']:<30} {layer['log2_nipa']:>9.2f} "
                  f"{layer['mean_rank_all_points']:>22.2f}")

    import scipy

    summary = {
        "model": model_id(args.model_name), "dataset": dataset_id(args.model_name, args.dataset),
        "metric": {"reduction": args.reduction, "tile_factor": args.tile_factor,
                   "device_model": args.device_model, "adc_term": args.adc_term, "published": published},
        "accuracy": args.accuracy, "x": "log2(NIPA)",
        "y": f"mean {measure} over chips" + (" (%)" if not lower else f", times -1 (sign {sign})"),
        "measure": measure, "sign": sign, "sign_note": sign_note(measure),
        "ideal_loss": grouped.ideal_loss, "ideal_perplexity": grouped.ideal_perplexity,
        "loss_beside_accuracy": loss_check,
        "points": len(rows), "chips_per_point": {str(k): v for k, v in grouped.chip_counts().items()},
        "chips_total": int(sum(r["chips"] for r in rows)), "repeated_chip_records": grouped.duplicates,
        "ideal_top1": grouped.ideal_top1, "ideal_top5": grouped.ideal_top5,
        "bootstrap": args.bootstrap, "seed": args.seed, "confidence": args.confidence,
        "groups": groups, "one_factor_pairs": pairs, "chip_agreement": reliability,
        "noise_ceiling": ceiling, "chip_count_curve": curve, "layer_noise": check,
        "per_layer": None if layers is None else {"point_index": index, "point": describe_row(rows[index]),
                                                  "layers": layers},
        "records": str(records_path), "records_run": grouped.run, "hw_files": grouped.hw_files,
        "stats": str(stats_path), "stats_source": stats.meta.get("source"),
        "stats_created": stats.meta.get("created"), "stats_weights_sha1": stats.meta.get("weights_sha1"),
        "stats_count_padding": stats.meta.get("count_padding"),
        "outputs": {k: str(v) for k, v in paths.items()},
        "nipa_version": __version__, "numpy_version": np.__version__, "scipy_version": scipy.__version__,
        "python_version": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    import json

    paths["summary_json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("validate.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
