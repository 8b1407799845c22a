"""What validate.py prints and draws: the agreement table, the chip curve, the layer-noise lines, the points
CSV and the scatter plot of log2 NIPA against the ground truth (nipa.pipelines.validation computes them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nipa.results.correlation import COEFFICIENTS, sign_note


def measure_column(measure: str) -> str:
    """The points-table column prefix of a measure: accuracy_* for top1/top5 (as always), else loss_*,
    perplexity_*."""
    return "accuracy" if measure in ("top1", "top5") else measure


def format_chip_curve(curve: dict[str, Any]) -> str:
    """Kendall's tau against the chips per point (is the ground truth converged?)."""
    steps = ", ".join(f"{m}: {t:.3f}" for m, t in zip(curve["chips"], curve["kendall"], strict=True) if t is not None)
    text = f"Kendall tau-b with m chips per point (mean over {curve['draws']} draws of m chips): {steps}"
    if curve["gain_last_doubling"] is not None:
        text += (f"\n  from {curve['doubling_from']} to {curve['chips'][-1]} chips tau moved "
                 f"{curve['gain_last_doubling']:+.3f}: more chips per point "
                 + ("would still change it" if abs(curve["gain_last_doubling"]) >= 0.01 else "would barely change it"))
    return text


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
    parameter, with the float model's accuracy as a dashed line. Perplexity, positive and heavy-tailed
    over chips, goes on a log axis with bars from the lowest to the highest chip (a std bar would reach
    below zero)."""
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
        if accuracy == "perplexity":
            chips = [[float(v) for v in str(r.get(f"{column}_chips", "")).split()] or [y]
                     for r, y in zip(chosen, ys, strict=True)]
            # (the chips are written to 6 digits: a bar may round to just past the mean)
            errs = [[max(0.0, y - min(c)) for y, c in zip(ys, chips, strict=True)],
                    [max(0.0, max(c) - y) for y, c in zip(ys, chips, strict=True)]]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", ms=5, color=color, ecolor=color, elinewidth=0.8, capsize=2,
                    alpha=0.85, label=f"{value} ({len(chosen)})")
    unit = "%" if accuracy in ("top1", "top5") else ""
    if ideal is not None:
        ax.axhline(ideal, color="0.3", ls="--", lw=1, label=f"float model {ideal:.2f}{unit}")
    ax.set_xlabel("log2(NIPA)")
    ax.set_ylabel(f"simulated {accuracy} accuracy (%), mean over chips" if unit else
                  f"simulated {accuracy} (lower is better), mean over chips"
                  + ("\n(bars: lowest to highest chip)" if accuracy == "perplexity" else ""))
    if accuracy == "perplexity":
        ax.set_yscale("log")
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


def format_report(result: Any) -> str:
    """Every line validate.py prints for a nipa.pipelines.validation.ValidationResult, in the order it always had."""
    settings, grouped, summary = result.settings, result.grouped, result.summary
    measure, lower = summary["measure"], summary["sign"] < 0
    lines = [f"{settings.model_name} on {settings.dataset}: {grouped.describe_chips()} from {result.records_path}"
             + (f" ({grouped.duplicates} repeated chip records counted once)" if grouped.duplicates else "")]
    if grouped.ideal_top1 is not None:
        lines.append(f"float model {settings.accuracy if settings.accuracy == 'top1' else 'top1'}: "
                     f"{grouped.ideal_top1:.2f}%")
    if lower and grouped.ideal(measure) is not None:
        lines.append(f"float model {measure}: {grouped.ideal(measure):.4f}")
    lines.append(f"{result.metric_name}, statistics {result.stats_path}; log2(NIPA) vs mean {measure} over chips; "
                 f"{settings.bootstrap} bootstrap resamples (seed {settings.seed})")
    if lower:
        lines.append(f"sign -1: {sign_note(measure)}")
    lines.append(format_groups(summary["groups"], settings.confidence))
    loss_check = summary["loss_beside_accuracy"]
    if loss_check is not None:
        lines.append(f"test loss beside {measure} (sign -1, against -loss; agreement positive): Kendall tau-b [CI] p "
                     f"{_fmt(loss_check['groups'][0]['kendall'])}  Pearson {_fmt(loss_check['groups'][0]['pearson'])}")
    reliability, ceiling, curve = summary["chip_agreement"], summary["noise_ceiling"], summary["chip_count_curve"]
    if reliability["kendall_between_chips"] is not None:
        between = reliability["kendall_between_chips"]
        lines.append(f"ground truth against itself: Kendall tau-b between two chips {between:+.3f} "
                     f"(mean over {reliability['chip_pairs']} chip pairs)")
    if ceiling and ceiling["kendall"] is not None:
        lines.append(f"noise ceiling: a perfect ranking would score Kendall tau-b about {ceiling['kendall']:.3f} "
                     f"against these chip means (chip std, median {ceiling['median_chip_std']:.2f}"
                     f"{' points' if not lower else ''}; rough, see README)")
    if curve:
        lines.append(format_chip_curve(curve))
    lines.append("pairs of points differing in one parameter only (concordant / discordant / tied in NIPA / "
                 f"tied in {'accuracy' if not lower else measure}):")
    for name, count in summary["one_factor_pairs"].items():
        if count["pairs"]:
            lines.append(f"  {name:<14} {count['pairs']:>5} pairs: {count['concordant']:>5} / "
                         f"{count['discordant']:>5} / {count['tied_x']:>5} / {count['tied_y']:>5}")
    if summary["layer_noise"] is not None:
        lines.append(format_layer_noise(summary["layer_noise"]))
    per_layer = summary["per_layer"]
    if per_layer is not None:
        index, row = per_layer["point_index"], result.rows[per_layer["point_index"]]
        lines.append(f"layers by sensitivity at point {index} ({per_layer['point']}, log2 NIPA "
                     f"{row['log2_nipa']:.2f}, {measure} {row[measure_column(measure) + '_mean']:.2f}"
                     f"{'' if lower else '%'}); most sensitive (lowest per-layer NIPA) first:")
        lines.append(f"  {'rank':>4} {'layer':<30} {'log2 NIPA':>9} {'mean rank, all points':>22}")
        for layer in per_layer["layers"]:
            lines.append(f"  {layer['rank']:>4} {layer['layer']:<30} {layer['log2_nipa']:>9.2f} "
                         f"{layer['mean_rank_all_points']:>22.2f}")
    lines.append("wrote " + ", ".join(str(p) for p in result.paths.values()))
    return "\n".join(lines)
