"""validate.py's pipeline: does NIPA rank hardware points as the slicing simulation does?

`run_validation(ValidateSettings(...))` reads main.py's records (nipa.results.ground_truth) and stat.py's
statistics, computes NIPA and its terms per point, the agreement (Kendall tau-b, Spearman, Pearson with
p-values and bootstrap intervals) on all points and per parameter value, the ground truth's own
reliability (chip against chip, noise ceiling, chips-per-point curve), one-factor pairs, and optionally the
measured layer noise and the per-layer sensitivity ranking; it writes the points CSV, the plot and the
summary JSON (nipa.paths.validation_stem) and returns a `ValidationResult` that
nipa.results.validation_report.format_report prints. Inputs that are missing raise a UserError naming the command
that makes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nipa import __version__, paths
from nipa.errors import UserError
from nipa.estimation.metric import (
    VARI_CODE,
    adc_step,
    combo_device_variance,
    input_adc_factor,
    nipa_metric,
    per_layer_nipa,
    slice_noise_terms,
    weight_rounding_noise,
)
from nipa.estimation.stats import ModelStats, check_stats_weights, combo_key, load_statistics
from nipa.hardware.compat import Compat
from nipa.hardware.config import HWConfig
from nipa.results.correlation import (
    Agreement,
    agreement,
    chip_agreement,
    chip_count_curve,
    chip_mean,
    chip_std,
    measure_sign,
    noise_ceiling,
    one_factor_pairs,
    sign_note,
    split_by,
)
from nipa.results.ground_truth import GroupedRecords, PointResult, RecordsError, read_ground_truth
from nipa.results.validation_report import measure_column, plot_points, write_csv
from nipa.workloads.zoo import dataset_id, model_id, results_path, statistics_path

if TYPE_CHECKING:
    from nipa.workloads.workload import Workload

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


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


@dataclass
class ValidateSettings:
    """What validate.py is asked (its options, by the same names)."""

    model_name: str = "smallcnn"
    dataset: str = "mnist5k"
    records: str | None = None  # default results/{model}/{dataset}_accsim.jsonl
    stats: str | None = None  # default results/stats/{model}_{dataset}.json
    out_dir: str | None = None  # default results/{model}/
    reduction: str = DEFAULTS["reduction"]
    adc_term: str = DEFAULTS["adc_term"]
    tile_factor: str = DEFAULTS["tile_factor"]
    device_model: str = DEFAULTS["device_model"]
    accuracy: str = "top1"
    measure: str = "top1"  # top1, top5, loss or perplexity (lower-is-better ones are signed -1)
    bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0
    color_by: str = "wl_weight"
    group_by: Sequence[str] = DEFAULT_GROUPS
    per_layer: bool = False
    point_index: int | None = None
    no_plot: bool = False
    layer_noise: bool = False
    layer_noise_chips: int = 3
    layer_noise_batch: int | None = None
    # The model and data (--layer_noise loads them; nipa.workloads.workload.Workload); None: from the fields above.
    workload: Workload | None = None


@dataclass
class ValidationResult:
    """What run_validation found and wrote."""

    settings: ValidateSettings
    grouped: GroupedRecords
    rows: list[dict[str, Any]]  # one per point (the points CSV)
    summary: dict[str, Any]  # also written as JSON
    paths: dict[str, Path]  # the files written
    metric_name: str
    records_path: Path
    stats_path: Path



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


def main_command(settings: ValidateSettings, records_path: Path) -> str:
    """The main.py command line that writes the records validate.py looks for."""
    custom = records_path != default_results_path(settings.model_name, settings.dataset)
    return _command("main.py", [("--model_name", settings.model_name), ("--dataset", settings.dataset),
                                ("--HWdes", "HW_config/Search_space.ini"), ("--sample_num", 0),
                                ("--cycle", 3), ("--out", str(records_path) if custom else None)])


def stat_command(settings: ValidateSettings, stats_path: Path, grouped: GroupedRecords | None,
                 combos: Sequence[tuple[int, int, int]] | None = None) -> str:
    """The stat.py command line for the records' INI files (or for some combinations), with the layer
    selection the simulation used and the output path validate.py reads."""
    run = (grouped.run if grouped else None) or {}
    options: list[tuple[str, Any]] = [("--model_name", settings.model_name), ("--dataset", settings.dataset)]
    if combos:
        options += [("--wl_weight", sorted({c[0] for c in combos})), ("--subArray", sorted({c[1] for c in combos})),
                    ("--cellbit", sorted({c[2] for c in combos}))]
    else:
        options.append(("--HWdes", (grouped.hw_files if grouped and grouped.hw_files else None)
                        or ["HW_config/Search_space.ini"]))
    options += [("--exclude_layer", run.get("exclude") or None), ("--include_layer", run.get("include")),
                ("--out", None if stats_path == default_stats_path(settings.model_name, settings.dataset)
                 else str(stats_path))]
    return _command("stat.py", options)


def load_inputs(settings: ValidateSettings, note: Callable[[str], None] = _stderr
                ) -> tuple[GroupedRecords, ModelStats, Path, Path]:
    """Records grouped per point, and statistics that cover every recorded point (or MissingInput)."""
    name, dataset = settings.model_name, settings.dataset
    records_path = Path(settings.records) if settings.records else default_results_path(name, dataset)
    stats_path = Path(settings.stats) if settings.stats else default_stats_path(name, dataset)
    measure = getattr(settings, "measure", "top1")
    names = (("model", model_id(settings.model_name)), ("dataset", dataset_id(settings.model_name, settings.dataset)))
    grouped = read_ground_truth(records_path, measure, main_command(settings, records_path),
                                model=names[0][1], dataset=names[1][1])
    if not stats_path.is_file():
        raise MissingInput(f"no bit statistics at {stats_path}. Make them with:\n  "
                           + stat_command(settings, stats_path, grouped))
    stats = load_statistics(stats_path)
    check_stats_weights(stats, (grouped.run or {}).get("weights"), stats_path,
                        note)
    for name, wanted in names:
        have = stats.meta.get(name)
        if have not in (None, "", wanted):
            raise MissingInput(f"{stats_path} holds statistics of {name} {have!r}, not {wanted!r}. Make the "
                               f"right ones with:\n  {stat_command(settings, stats_path, grouped)}")
    if grouped.mapped_layers is not None and list(stats.layers) != grouped.mapped_layers:
        raise MissingInput(f"{stats_path} describes layers {list(stats.layers)} but the simulation mapped "
                           f"{grouped.mapped_layers}. Recompute them with the simulation's layer selection:\n  "
                           + stat_command(settings, stats_path, grouped))
    needed = {(p.config.wl_weight, p.config.subArray, p.config.cellBit) for p in grouped.points}
    missing = sorted(c for c in needed if combo_key(*c) not in stats.combos)
    if missing:
        raise MissingInput(f"{stats_path} lacks the statistics of {', '.join(combo_key(*c) for c in missing)} "
                           f"needed by recorded points. Add them with:\n  "
                           + stat_command(settings, stats_path, grouped, missing))
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
    if adc_term == "input_bits":  # nipa.estimation.metric.input_adc_factor scales ADC_k, i.e. delta^2
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


def layer_noise_check(settings: ValidateSettings, grouped: GroupedRecords, stats: ModelStats,
                      rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure every mapped layer's noise at every recorded point (nipa.estimation.layer_noise), add it to `rows`,
    and compare: per-layer NIPA with the measured per-layer SNR, model-level NIPA with the measured SNR
    averaged over layers, and that measured SNR with the accuracy."""
    from nipa.estimation.layer_noise import measure_layer_noise
    from nipa.workloads.workload import Workload

    run = grouped.run or {}
    # the ground truth's seed (a --split permutation is its)
    workload = dataclasses.replace(settings.workload or Workload.from_args(settings), seed=int(run.get("seed", 0)))
    model, _, data = workload.load(batch_size=settings.layer_noise_batch)
    batch = workload.calibration_inputs(data, 1, batch_size=settings.layer_noise_batch, seed=int(run.get("seed", 0)))[0]
    configs = [p.config for p in grouped.points]
    layers, noise = measure_layer_noise(model, configs, batch, chips=settings.layer_noise_chips,
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
    predicted = np.log2(np.atleast_2d(per_layer_nipa(stats, configs, tile_factor=settings.tile_factor,
                                                     device_model=settings.device_model, adc_term=settings.adc_term)))
    x = np.array([r["log2_nipa"] for r in rows])
    y = measure_y(rows, getattr(settings, "measure", "top1"))
    options = {"bootstrap": settings.bootstrap, "seed": settings.seed, "confidence": settings.confidence}
    return {
        "inputs": int(batch.shape[0]), "chips": settings.layer_noise_chips,
        "nipa_vs_measured": agreement(x, model_level, **options).to_dict(),
        "per_layer_nipa_vs_measured": {name: agreement(predicted[:, j], measured[:, j], **options).to_dict()
                                       for j, name in enumerate(layers)},
        "measured_vs_accuracy": agreement(model_level, y, **options).to_dict(),
    }


def run_validation(settings: ValidateSettings, note: Callable[[str], None] = _stderr) -> ValidationResult:
    """Everything validate.py does: reads, computes, writes the CSV, plot and summary JSON; returns the
    result its report prints (nipa.results.validation_report.format_report). `note` receives warnings about the
    inputs (statistics of other weights)."""
    grouped, stats, records_path, stats_path = load_inputs(settings, note)
    published = all(getattr(settings, name) == value for name, value in PUBLISHED.items())
    default = all(getattr(settings, name) == value for name, value in DEFAULTS.items())
    # A metric variant names its files: {dataset}_nipa_{reduction}_tile-{k_T}_device-{...}_adc-{...}.
    prefixes = {"reduction": "", "tile_factor": "tile-", "device_model": "device-", "adc_term": "adc-"}
    variant = "" if default else "_" + "_".join(
        prefix + getattr(settings, name) for name, prefix in prefixes.items()
        if getattr(settings, name) != DEFAULTS[name])
    out_dir = Path(settings.out_dir) if settings.out_dir else paths.model_dir(model_id(settings.model_name))
    measure = getattr(settings, "measure", settings.accuracy)
    lower = measure_sign(measure) < 0
    # A lower-is-better measure names its files; top-1 and top-5 keep the files they always had.
    stem = paths.validation_stem(out_dir, dataset_id(settings.model_name, settings.dataset), variant,
                                 measure if lower else None)
    outputs = {"points_csv": Path(f"{stem}_points.csv"), "plot_png": Path(f"{stem}.png"),
               "summary_json": Path(f"{stem}_summary.json")}

    source = str(stats.meta.get("source", ""))
    if source.startswith("random_init"):
        warnings.warn(f"{stats_path}: statistics of untrained weights ({source})", stacklevel=1)
    rows = point_table(grouped, stats, settings.reduction, settings.tile_factor, measure, settings.device_model,
                       settings.adc_term)
    groups = group_agreements(rows, grouped, settings.group_by, settings.bootstrap, settings.seed,
                              settings.confidence, measure)
    x = np.array([r["log2_nipa"] for r in rows])
    y = measure_y(rows, measure)
    pairs = one_factor_pairs([p.config for p in grouped.points], x, y, GROUP_FIELDS + ("vari", "ind_vari",
                                                                                        "laplace_b", "SAF_prop"))

    reliability = chip_agreement(grouped.points, measure)
    ceiling = noise_ceiling(grouped.points, seed=settings.seed, measure=measure) if measure != "top5" else None
    sign = measure_sign(measure)
    curve = chip_count_curve(x, [[sign * v for v in chip_accuracies(p, measure)] for p in grouped.points],
                             seed=settings.seed)
    # The test loss beside top-1 (CNNs, multiple-choice tasks): a continuous second measure, all points only.
    loss_check = None
    if not lower and all(p.values("loss") for p in grouped.points):
        loss_groups = group_agreements(rows, grouped, (), settings.bootstrap, settings.seed, settings.confidence,
                                       "loss")
        loss_check = {"measure": "loss", "sign": -1, "note": sign_note("loss"), "ideal": grouped.ideal_loss,
                      "y": "mean loss over chips (nats)", "groups": loss_groups}
    metric_name = (f"NIPA {settings.reduction}/k_T={settings.tile_factor}/device={settings.device_model}"
                   f"/adc={settings.adc_term}"
                   + (" (published)" if published else " (default)" if default else " (variant)"))

    check = None
    if settings.layer_noise:
        check = layer_noise_check(settings, grouped, stats, rows)

    write_csv(rows, outputs["points_csv"])
    overall = groups[0]
    if not settings.no_plot:
        title = (f"{settings.model_name} on {settings.dataset}: {metric_name}\n{grouped.describe_chips()}")
        plot_points(rows, settings.color_by, outputs["plot_png"], title, grouped.ideal(measure), overall, measure)
    else:
        outputs.pop("plot_png")

    layers = None
    if settings.per_layer:
        index = representative_index(rows, settings.point_index)
        layers = layer_ranking(stats, rows, [p.config for p in grouped.points], index, settings.tile_factor,
                               settings.device_model, settings.adc_term)
        outputs["layers_csv"] = Path(f"{stem}_layers.csv")
        write_csv(layers, outputs["layers_csv"])

    import scipy

    summary = {
        "model": model_id(settings.model_name), "dataset": dataset_id(settings.model_name, settings.dataset),
        "metric": {"reduction": settings.reduction, "tile_factor": settings.tile_factor,
                   "device_model": settings.device_model, "adc_term": settings.adc_term, "published": published},
        "accuracy": settings.accuracy, "x": "log2(NIPA)",
        "y": f"mean {measure} over chips" + (" (%)" if not lower else f", times -1 (sign {sign})"),
        "measure": measure, "sign": sign, "sign_note": sign_note(measure),
        "ideal_loss": grouped.ideal_loss, "ideal_perplexity": grouped.ideal_perplexity,
        "loss_beside_accuracy": loss_check,
        "points": len(rows), "chips_per_point": {str(k): v for k, v in grouped.chip_counts().items()},
        "chips_total": int(sum(r["chips"] for r in rows)), "repeated_chip_records": grouped.duplicates,
        "ideal_top1": grouped.ideal_top1, "ideal_top5": grouped.ideal_top5,
        "bootstrap": settings.bootstrap, "seed": settings.seed, "confidence": settings.confidence,
        "groups": groups, "one_factor_pairs": pairs, "chip_agreement": reliability,
        "noise_ceiling": ceiling, "chip_count_curve": curve, "layer_noise": check,
        "per_layer": None if layers is None else {"point_index": index, "point": describe_row(rows[index]),
                                                  "layers": layers},
        "records": str(records_path), "records_run": grouped.run, "hw_files": grouped.hw_files,
        "stats": str(stats_path), "stats_source": stats.meta.get("source"),
        "stats_created": stats.meta.get("created"), "stats_weights_sha1": stats.meta.get("weights_sha1"),
        "stats_count_padding": stats.meta.get("count_padding"),
        "outputs": {k: str(v) for k, v in outputs.items()},
        "nipa_version": __version__, "numpy_version": np.__version__, "scipy_version": scipy.__version__,
        "python_version": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    outputs["summary_json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return ValidationResult(settings=settings, grouped=grouped, rows=rows, summary=summary, paths=outputs,
                            metric_name=metric_name, records_path=records_path, stats_path=stats_path)
