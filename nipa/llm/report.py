"""The language-model validation in a few lines: how NIPA and the fast estimate rank and predict the
simulated perplexity, the estimate's speedup, and the sensitivity of every mapped block.

It reads what scripts/llm_validate.sh has made (nothing is simulated here):
- validate.py's summary and points CSV of `--measure perplexity` with `--layer_noise` (the measured
  log2 SNR of every mapped layer at every point, chips of the ground truth's seed);
- wrap_error.py's summary of `--measure perplexity` (the estimate against the simulator, timed in that run);
- stat.py's statistics, for the per-layer NIPA of every point (nipa.estimation.metric.per_layer_nipa).

Per block, a block's noise is the mean relative noise power of its layers (measured, or predicted as
1 / NIPA of each layer), so a block's log2 SNR is -log2 of that mean, for NIPA and measurement alike.
Sensitivity ranks: 1 is the block with the lowest SNR (the most sensitive), averaged over the points.

    python -m nipa.llm.report --model_name smollm2-135m --dataset pydoc --seq_len 256 --max_tokens 512
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from nipa.errors import UserError
from nipa.hardware.config import HWConfig

MEASURED_PREFIX = "measured_log2_snr_"
_BLOCK_OF_LAYER = re.compile(r"^(.*?\.[0-9]+)\.")  # the module path up to the first numbered component


def block_of(layer: str) -> str:
    """The block a mapped layer sits in: its name up to the first numbered component
    (model.layers.10.mlp.up_proj -> model.layers.10); a layer outside numbered blocks is its own block."""
    found = _BLOCK_OF_LAYER.match(layer)
    return found.group(1) if found else layer


@dataclass(frozen=True)
class BlockSensitivity:
    """One mapped block: its layers, how NIPA ranks its SNR over the points against the measurement, and
    its sensitivity rank among the blocks (1 = lowest SNR), averaged over the points."""

    block: str
    layers: int
    kendall_over_points: float | None
    predicted_log2_snr: float  # mean over the points
    measured_log2_snr: float
    predicted_rank: float
    measured_rank: float


@dataclass(frozen=True)
class SensitivityReport:
    blocks: list[BlockSensitivity]
    # at each point, Kendall tau over all mapped layers of per-layer log2 NIPA against measured log2 SNR
    layer_kendall_per_point: list[float | None]
    block_kendall_per_point: list[float | None]  # the same over the blocks (needs 3 or more)


def _tau(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(sps.kendalltau(x, y).statistic)
    return None if np.isnan(value) else value


def block_sensitivity(layers: Sequence[str], predicted_nipa: np.ndarray,
                      measured_log2_snr: np.ndarray) -> SensitivityReport:
    """Compare per-layer NIPA [points, layers] with the measured per-layer log2 SNR [points, layers]
    (the same layer order), per block and across layers at every point."""
    predicted_nipa = np.atleast_2d(np.asarray(predicted_nipa, dtype=float))
    measured_log2_snr = np.atleast_2d(np.asarray(measured_log2_snr, dtype=float))
    if predicted_nipa.shape != measured_log2_snr.shape or predicted_nipa.shape[1] != len(layers):
        raise ValueError(f"per-layer NIPA {predicted_nipa.shape} and measured SNR {measured_log2_snr.shape} "
                         f"must both be [points, {len(layers)} layers]")
    names = list(dict.fromkeys(block_of(name) for name in layers))
    columns = {b: [j for j, name in enumerate(layers) if block_of(name) == b] for b in names}
    # a block's noise: the mean relative noise power of its layers; NIPA is a layer's SNR
    predicted = np.stack([-np.log2((1.0 / predicted_nipa[:, c]).mean(axis=1)) for c in columns.values()], axis=1)
    measured = np.stack([-np.log2((2.0 ** -measured_log2_snr[:, c]).mean(axis=1)) for c in columns.values()], axis=1)
    # rank 1 = the lowest SNR at a point (ties share the mean rank)
    predicted_ranks = np.apply_along_axis(sps.rankdata, 1, predicted)
    measured_ranks = np.apply_along_axis(sps.rankdata, 1, measured)
    blocks = [BlockSensitivity(block=b, layers=len(columns[b]),
                               kendall_over_points=_tau(predicted[:, k], measured[:, k]),
                               predicted_log2_snr=float(predicted[:, k].mean()),
                               measured_log2_snr=float(measured[:, k].mean()),
                               predicted_rank=float(predicted_ranks[:, k].mean()),
                               measured_rank=float(measured_ranks[:, k].mean()))
              for k, b in enumerate(names)]
    log2_nipa = np.log2(predicted_nipa)
    return SensitivityReport(
        blocks=blocks,
        layer_kendall_per_point=[_tau(log2_nipa[i], measured_log2_snr[i]) for i in range(len(log2_nipa))],
        block_kendall_per_point=[_tau(predicted[i], measured[i]) if len(names) >= 3 else None
                                 for i in range(len(predicted))])


def _cast(field: dataclasses.Field, text: str) -> Any:
    kind = type(field.default)
    return kind(float(text)) if kind is int else kind(text)


def points_from_csv(path: Path) -> tuple[list[HWConfig], list[str], np.ndarray]:
    """(hardware points, mapped layers, measured per-layer log2 SNR [points, layers]) of validate.py's
    points CSV written with --layer_noise."""
    if not path.is_file():
        raise UserError(f"{path}: no points CSV; run validate.py --measure perplexity --layer_noise first")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise UserError(f"{path}: no points")
    layers = [name[len(MEASURED_PREFIX):] for name in rows[0] if name.startswith(MEASURED_PREFIX)]
    if not layers:
        raise UserError(f"{path}: no measured_log2_snr_<layer> columns; run validate.py with --layer_noise")
    fields = {f.name: f for f in dataclasses.fields(HWConfig)}
    configs = [HWConfig(**{name: _cast(fields[name], row[name]) for name in fields if row.get(name) not in (None, "")})
               for row in rows]
    measured = np.array([[float(row[MEASURED_PREFIX + name]) for name in layers] for row in rows])
    return configs, layers, measured


def _read_json(path: Path, made_by: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: not found; it is made by {made_by}")
    return json.loads(path.read_text())


def headline(validate_summary: dict[str, Any], wrap_summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures: Kendall tau of NIPA and of the estimate against the simulated perplexity, the
    estimate's mean absolute error (perplexity and relative) and the speedup timed in wrap_error's run."""
    overall = next(g for g in validate_summary["groups"] if g["group"] == "all")
    timing = wrap_summary.get("timing") or {}
    return {
        "points": overall["n"], "chips": overall.get("chips"),
        "ideal_perplexity": validate_summary.get("ideal_perplexity"),
        "nipa_kendall": overall["kendall"]["value"],
        "nipa_kendall_ci": [overall["kendall"]["ci_low"], overall["kendall"]["ci_high"]]
        if overall["kendall"].get("ci_low") is not None else None,
        "estimate_kendall": wrap_summary.get("kendall_tau"),
        "estimate_mean_abs_error": wrap_summary.get("mean_abs_error"),
        "estimate_max_abs_error": wrap_summary.get("max_abs_error"),
        "estimate_mean_abs_relative_error_pct": wrap_summary.get("mean_abs_relative_error_pct"),
        "estimate_max_abs_relative_error_pct": wrap_summary.get("max_abs_relative_error_pct"),
        "mean_chip_std": wrap_summary.get("mean_chip_std"),
        "speedup": timing.get("speedup"), "speedup_with_calibration": timing.get("speedup_with_calibration"),
        "speedup_amortized_over_grid": timing.get("speedup_amortized_over_grid"),
        "timed_points": timing.get("points"),
    }


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(figures: dict[str, Any], sensitivity: SensitivityReport) -> str:
    ci = figures["nipa_kendall_ci"]
    lines = [
        f"{figures['points']} points, {figures['chips']} chips; float model perplexity "
        f"{_fmt(figures['ideal_perplexity'])} (lower is better; taus are signed so agreement is positive)",
        f"  Kendall tau, NIPA vs simulated perplexity:          {_fmt(figures['nipa_kendall'])}"
        + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""),
        f"  Kendall tau, fast estimate vs simulated perplexity: {_fmt(figures['estimate_kendall'])}",
        f"  estimate mean |error|: {_fmt(figures['estimate_mean_abs_error'])} perplexity "
        f"({_fmt(figures['estimate_mean_abs_relative_error_pct'], '.2f')}%), max "
        f"{_fmt(figures['estimate_max_abs_error'])} ({_fmt(figures['estimate_max_abs_relative_error_pct'], '.2f')}%); "
        f"chip std {_fmt(figures['mean_chip_std'])}",
        f"  speedup of the estimate (timed on {figures['timed_points']} points in the same run): "
        f"{_fmt(figures['speedup'], '.1f')}x, {_fmt(figures['speedup_amortized_over_grid'], '.1f')}x with the ADC "
        f"calibration shared, {_fmt(figures['speedup_with_calibration'], '.1f')}x with one per point",
        "per-block sensitivity (NIPA vs measured layer noise; rank 1 = lowest SNR, mean over points):",
        f"  {'block':<20} {'layers':>6} {'tau over points':>15} {'log2 SNR NIPA':>13} {'measured':>9} "
        f"{'rank NIPA':>9} {'measured':>9}",
    ]
    for b in sensitivity.blocks:
        lines.append(f"  {b.block:<20} {b.layers:>6} {_fmt(b.kendall_over_points):>15} {b.predicted_log2_snr:>13.2f} "
                     f"{b.measured_log2_snr:>9.2f} {b.predicted_rank:>9.2f} {b.measured_rank:>9.2f}")
    for label, values in (("layers", sensitivity.layer_kendall_per_point),
                          ("blocks", sensitivity.block_kendall_per_point)):
        known = [v for v in values if v is not None]
        if known:
            lines.append(f"  ranking the {label} at each point, Kendall tau NIPA vs measured: mean {np.mean(known):.3f}"
                         f" (min {min(known):.3f}, max {max(known):.3f}, {len(known)} points)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from nipa.cli import add_text_window_args, resolve_model_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", required=True, help="the LLM given to main.py")
    parser.add_argument("--dataset", required=True, help="the text task given to main.py (e.g. pydoc)")
    add_text_window_args(parser)
    parser.add_argument("--results", default=None, help="folder of validate's and wrap_error's files "
                                                          "(default results/{model}/)")
    parser.add_argument("--stats", default=None, help="stat.py's statistics (default results/stats/...)")
    parser.add_argument("--out", default=None, help="JSON of the figures (default <results>/{dataset}_llm_report.json)")
    args = parser.parse_args(argv)
    return resolve_model_args(parser, args)


def main(argv: Sequence[str] | None = None) -> int:
    from nipa.estimation.metric import per_layer_nipa
    from nipa.estimation.stats import load_statistics
    from nipa.workloads.zoo import dataset_id, model_id, statistics_path

    args = parse_args(argv)
    try:
        results = Path(args.results) if args.results else Path("results") / model_id(args.model_name)
        name = dataset_id(args.model_name, args.dataset)
        validate_summary = _read_json(results / f"{name}_nipa_perplexity_summary.json",
                                      "validate.py --measure perplexity")
        wrap_summary = _read_json(results / f"{name}_wrap_perplexity_summary.json",
                                  "wrap_error.py --measure perplexity")
        configs, layers, measured = points_from_csv(results / f"{name}_nipa_perplexity_points.csv")
        stats = load_statistics(Path(args.stats) if args.stats else statistics_path(args.model_name, args.dataset))
        if list(stats.layers) != layers:
            raise UserError(f"the statistics' layers {list(stats.layers)[:3]}... are not the measured layers "
                            f"{layers[:3]}...: rerun stat.py with the records' --block")
        metric = validate_summary.get("metric", {})
        predicted = per_layer_nipa(stats, configs, tile_factor=metric.get("tile_factor", "tiles"),
                                   device_model=metric.get("device_model", "published"),
                                   adc_term=metric.get("adc_term", "ground_truth"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figures = headline(validate_summary, wrap_summary)
    sensitivity = block_sensitivity(layers, predicted, measured)
    print(format_report(figures, sensitivity))
    out = Path(args.out) if args.out else results / f"{name}_llm_report.json"
    out.write_text(json.dumps({"figures": figures, "blocks": [dataclasses.asdict(b) for b in sensitivity.blocks],
                               "layer_kendall_per_point": sensitivity.layer_kendall_per_point,
                               "block_kendall_per_point": sensitivity.block_kendall_per_point}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
