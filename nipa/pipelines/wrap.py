"""Non-slicing absolute accuracy against the ground truth (SPEC section 7): the library of wrap_error.py.

For every hardware point recorded by main.py (method "sliced"), `--cycle` error-injection draws
(`nipa.estimation.inject`) are evaluated; their mean is the prediction (never the draw nearest the ground truth).
Each draw is one record (method "fast") appended to results/{model}/{dataset}_wrap.jsonl and flushed,
so an interrupted run resumes. The summary compares per point the predicted accuracy with the mean
over the simulated chips: mean and max absolute error, Kendall's tau (also Spearman and Pearson), and
the speedup, measured in the same run on the same machine, data and batch size on a sample of points.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nipa.errors import UserError
from nipa.estimation.inject import AdcCalibration, InjectionModel, calibration_upstream, inject, redraw
from nipa.estimation.reliability import (
    TRUST_RATIO,
    TrustCheck,
    device_read_adc_error,
    ideal_layers,
    relative_adc_error,
    trusted,
)
from nipa.estimation.stats import ModelStats, combo_key
from nipa.hardware.compat import Compat
from nipa.hardware.config import HWConfig
from nipa.results.correlation import chips_wanted
from nipa.results.ground_truth import GroundTruth, MissingGroundTruth, PointTruth, read_ground_truth  # noqa: F401
from nipa.results.records import (
    FAST_KEY,
    RecordWriter,
    done_keys,
    environment,
    read_records,
    timestamp,
)
from nipa.simulator.crossbar import calibrate_adc, convert, release_workspaces
from nipa.simulator.evaluate import chip_order, evaluate
from nipa.workloads.zoo import dataset_id, model_id

MEASURES = ("top1", "loss", "perplexity")
LOWER_IS_BETTER = ("loss", "perplexity")
# "Near the float model" (the region where a user's design sits): within 2 accuracy points; for loss 0.02
# nats and for perplexity 2% (relative), which are the same width since d ppl / ppl = d loss.
NEAR_FLOAT = {"top1": 2.0, "loss": 0.02, "perplexity": 0.02}
WORST_POINTS = 5
ADC_CHECK = "adc_check"  # the record of a point's trust measure (nipa.estimation.reliability)
# Its two parts (nipa.estimation.reliability.TrustCheck); "relative_adc_error" holds their larger per layer.
IDEAL_READS, DEVICE_READS = "adc_error_ideal_reads", "adc_error_device_reads"
# What a point the trust measure does not trust gets: the estimate all the same, or chips of the simulator
# (adaptive fidelity: the estimate where it holds, the ground truth's arithmetic where it may not).
UNTRUSTED = ("estimate", "simulate")
# The simulated chips of untrusted points use the ground truth's seed plus this: other chips than the
# ground truth's, so that the comparison measures a prediction, not a copy.
FALLBACK_SEED_OFFSET = 1_000_003


def main_command(model_name: str, dataset: str) -> str:
    return (f"python main.py --model_name {model_name} --dataset {dataset} "
            "--HWdes HW_config/Search_space.ini --sample_num 0 --cycle 3")


def load_ground_truth(path: str | Path, model_name: str, dataset: str, measure: str = "top1") -> GroundTruth:
    """The sliced records of a main.py results file, grouped by hardware point by the one reader
    (nipa.results.ground_truth); each point's `top1` holds the chips' `measure` (top1, loss or perplexity),
    `values` every measure recorded."""
    if measure not in MEASURES:
        raise UserError(f"--measure {measure}: choose one of {', '.join(MEASURES)}")
    grouped = read_ground_truth(path, measure, main_command(model_name, dataset), model=model_id(model_name),
                                dataset=dataset_id(model_name, dataset))
    return GroundTruth.of(grouped, measure, str(path))


def check_statistics(stats: ModelStats, points: Sequence[HWConfig], model_name: str, dataset: str,
                     layers: Sequence[str]) -> None:
    """Every point's (wl_weight, subArray, cellBit) and every mapped layer must be in the statistics."""
    missing = sorted({combo_key(p.wl_weight, p.subArray, p.cellBit) for p in points} - set(stats.combos))
    absent = [name for name in layers if name not in stats.layers]
    if missing or absent:
        problem = (f"no bit statistics for {', '.join(missing)}" if missing
                   else f"the bit statistics lack mapped layer(s) {absent}")
        raise UserError(f"{problem}; compute them with\n    python stat.py --model_name {model_name} "
                                f"--dataset {dataset} --HWdes <the INI the ground truth came from>")


# ----------------------------------------------------------------------------------------------------
# Running the fast method
# ----------------------------------------------------------------------------------------------------


@dataclass
class WrapSettings:
    """Everything that decides the fast method's numbers; stored with each record."""

    model_name: str
    dataset: str
    cycle: int = 3  # draws per point (at least, with target_se)
    # Draws added to a point until the standard error of their mean is at most target_se (as explore.py's
    # chips), at most max_cycle: where chips differ by several points, 3 draws scatter as much. None: cycle.
    target_se: float | None = None
    max_cycle: int | None = None
    seed: int = 0
    errors: InjectionModel = field(default_factory=InjectionModel)
    calib_batches: int = 1
    exclude: Sequence[str] = ()
    include: Sequence[str] | None = None
    batch_size: int = 256
    limit: int | None = None
    paired: bool = False  # diagnostic: draw d carries the simulator's chip d cells
    # The layer inputs the ADC calibration reads ("ideal" quantized model or "simulated"); None: the form's.
    calib_upstream: str | None = None
    # The ground truth's test order (nipa.simulator.evaluate.TEST_ORDERS): with "per_chip" its chips read
    # the test set in their own orders, and draw d reads it in chip d + 1's, since a per-tensor input
    # scale and a dynamic range are one batch's (mnist5k's file order is by class: an outlier).
    test_order: str = "fixed"
    # A user's model or data (nipa.workloads.workload.Workload.describe), stored with each record; None otherwise.
    workload: dict[str, Any] | None = None

    @property
    def most_draws(self) -> int:
        """The most draws a point's prediction averages."""
        return max(self.cycle, self.max_cycle or 0) if self.target_se is not None else self.cycle

    def draws_wanted(self, values: Sequence[float]) -> int:
        """How many draws a point with these draws' values needs (`cycle` without a target)."""
        if self.target_se is None:
            return self.cycle
        return chips_wanted(values, True, self.cycle, self.most_draws, self.target_se)

    def signature(self) -> dict[str, Any]:
        """What two fast records must share to be averaged together (besides point and draw)."""
        return {"model": model_id(self.model_name), "dataset": dataset_id(self.model_name, self.dataset),
                "seed": self.seed,
                "batch_size": self.batch_size, "limit": self.limit, "exclude": list(self.exclude),
                "include": None if self.include is None else list(self.include),
                "injection": dataclasses.asdict(self.errors),
                "calib_batches": self.calib_batches if self.errors.adc == "measured" else None,
                "paired": self.paired,
                # Only when chosen against the form's own (older records carry none and still resume).
                **({"calib_upstream": self.calib_upstream} if self.calib_upstream not in (
                    None, calibration_upstream(self.errors)) else {}),
                **({"test_order": self.test_order} if self.test_order != "fixed" else {})}


def cached_batches(loader, device: torch.device, max_mb: float = 1024) -> list | Any:
    """The loader's batches held on `device` when they fit in `max_mb`, else the loader itself: both
    methods then read the same tensors and neither pays the data pipeline per pass. A language-model
    task is returned as it is (it holds its tokens already)."""
    if hasattr(loader, "evaluate"):
        return loader
    batches, size = [], 0.0
    for inputs, labels in loader:
        size += inputs.numel() * inputs.element_size() / 2**20
        if size > max_mb:
            return loader
        batches.append((inputs.to(device), labels.to(device)))
    return batches


class FastMethod:
    """The error-injection prediction of one hardware point: `cycle` draws, their mean."""

    def __init__(self, model: nn.Module, settings: WrapSettings, stats: ModelStats | None,
                 calibration: AdcCalibration | None, device: torch.device) -> None:
        self.model, self.settings, self.stats = model, settings, stats
        self.calibration, self.device = calibration, device

    def injected(self, point: HWConfig, draw: int) -> nn.Module:
        s = self.settings
        return inject(self.model, point, exclude=s.exclude, include=s.include, seed=s.seed, draw=draw,
                      stats=self.stats, calibration=self.calibration, errors=s.errors,
                      paired=s.paired).to(self.device).eval()

    def calibrate(self, point: HWConfig) -> float:
        """Seconds spent measuring the ADC error for `point` now (0 when cached or not needed)."""
        if self.calibration is None or self.settings.errors.adc != "measured":
            return 0.0
        form = self.settings.errors.adc_form
        if point in self.calibration and form not in ("conditional", "planes", "repeated"):
            return 0.0
        started = time.perf_counter()
        # a no-op when already measured
        self.calibration.errors(point, conditional=form == "conditional", planes=form == "planes",
                                repeated=form == "repeated")
        return time.perf_counter() - started

    def adc_check(self, point: HWConfig) -> TrustCheck | None:
        """Per layer, the estimate's ADC error relative to the layer's signal at `point`, on ideal reads and
        through a programmed chip (`nipa.estimation.reliability`), on one calibration batch; None without a
        measured ADC error."""
        if self.calibration is None or self.settings.errors.adc != "measured":
            return None
        s, batches = self.settings, self.calibration.batches[:1]
        ideal = ideal_layers(self.model, point, exclude=s.exclude, include=s.include, device=self.device)
        return TrustCheck(
            relative_adc_error(self.model, point, s.errors, self.calibration, batches, exclude=s.exclude,
                               include=s.include, seed=s.seed, device=self.device, ideal=ideal),
            device_read_adc_error(self.model, point, batches, exclude=s.exclude, include=s.include, seed=s.seed,
                                  memory_mb=self.calibration.memory_mb, device=self.device, ideal=ideal))

    def draws(self, point: HWConfig, draws: Sequence[int], data) -> list[tuple[int, dict, float]]:
        """(draw, metrics, seconds) for each draw; the first draw's time includes the conversion,
        not the ADC calibration (see `calibrate`)."""
        results, model = [], None
        for draw in draws:
            started = time.perf_counter()
            if model is None:
                model = self.injected(point, draw)
            else:
                redraw(model, self.settings.seed, draw)
            order = chip_order(data, self.settings.seed, draw + 1) if self.settings.test_order == "per_chip" else data
            metrics = evaluate(model, order, self.device)
            results.append((draw, metrics, time.perf_counter() - started))
        return results


def run_fast(truth: GroundTruth, fast: FastMethod, data, out_path: str | Path,
             log: Callable[[str], None] = print) -> list[dict]:
    """Evaluate every recorded point `cycle` times (with `target_se`, more draws until the standard
    error of their mean is below it, at most `max_cycle`, in rounds that at most double them, each round's
    records written when it ends); records already in `out_path` (same settings) are kept, so an
    interrupted run resumes. Returns every fast record of these settings."""
    settings = fast.settings
    signature = settings.signature()
    existing = [r for r in read_records(out_path) if r.get("run") == signature]
    done = done_keys(existing, FAST_KEY, method="fast")
    writer = RecordWriter(out_path)
    if fast.calibration is not None:
        # One pass per (wl_weight, subArray, cellBit, wl_input, ADC mode) serves all its ADC resolutions.
        fast.calibration.prefetch(p.config for p in truth.points)
    skipped = sum((p.key, d) in done for p in truth.points for d in range(settings.most_draws))
    if skipped:
        log(f"{skipped} draws already recorded in {out_path}, resuming")
    records = list(existing)
    # A check made before the device-read part existed (no DEVICE_READS field) is made again; the last wins.
    checked = {r["config_key"] for r in existing if r.get("method") == ADC_CHECK and DEVICE_READS in r}
    values: dict[str, dict[int, float]] = {}  # per point, its draws' values of the measure
    for r in existing:
        if r.get(truth.measure) is not None:
            values.setdefault(r["config_key"], {})[int(r["draw"])] = float(r[truth.measure])
    for point in truth.points:
        have = values.setdefault(point.key, {})
        calib_s, results = None, []
        while True:
            wanted = settings.draws_wanted([have[d] for d in sorted(have) if d < settings.most_draws])
            if settings.target_se is not None:  # in rounds that at most double the draws: a few draws'
                wanted = min(wanted, max(settings.cycle, 2 * len(have)))  # spread is a rough guess
            draws = [d for d in range(wanted) if (point.key, d) not in done]
            if not draws:
                break
            if calib_s is None:
                calib_s = fast.calibrate(point.config)
            for draw, metrics, seconds in fast.draws(point.config, draws, data):
                record = {"model": model_id(settings.model_name),
                          "dataset": dataset_id(settings.model_name, settings.dataset), "method": "fast",
                          "injection": settings.errors.label() + (",paired" if settings.paired else ""),
                          "config": point.config.to_dict(), "config_key": point.key, "draw": draw,
                          "seed": settings.seed, **metrics, "wall_s": round(seconds, 4),
                          # A calibration pass (shared by the points of one key) is charged to the first
                          # draw that needed it.
                          "calibration_s": round(calib_s if not results else 0.0, 4), "run": signature,
                          "ground_truth": truth.source, "device": str(fast.device), "time": timestamp(),
                          **({"workload": settings.workload} if settings.workload else {}), **environment()}
                writer.append(record)
                records.append(record)
                results.append(metrics)
                done.add((point.key, draw))
                if metrics.get(truth.measure) is not None:
                    have[draw] = float(metrics[truth.measure])
        if point.key not in checked and fast.calibration is not None and settings.errors.adc == "measured":
            # Once per point, also for one whose draws were recorded before the check existed (its
            # injection calibrates the point when no draw did).
            started = time.perf_counter()
            check = fast.adc_check(point.config)
            check_s = time.perf_counter() - started  # with the point's calibration when no draw made it
            record = {"model": model_id(settings.model_name),
                      "dataset": dataset_id(settings.model_name, settings.dataset), "method": ADC_CHECK,
                      "config": point.config.to_dict(), "config_key": point.key,
                      "relative_adc_error": check.ratios, IDEAL_READS: check.ideal_reads,
                      DEVICE_READS: check.device_reads, "wall_s": round(check_s, 4), "run": signature,
                      "ground_truth": truth.source, "time": timestamp(),
                      **({"workload": settings.workload} if settings.workload else {})}
            writer.append(record)
            records.append(record)
            checked.add(point.key)
        if results:
            name, unit = truth.measure, "%" if truth.measure == "top1" else ""
            shown = ", ".join(f"{m[name]:.2f}" for m in results[:10]) + (", ..." if len(results) > 10 else "")
            used = [have[d] for d in sorted(have) if d < settings.most_draws]
            log(f"{point.config.describe()}  fast {np.mean(used):6.2f}{unit} ({len(used)} draws: {shown})  "
                f"simulated {point.mean:6.2f}{unit}")
    return records


# ----------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------


def _tau(predicted: np.ndarray, simulated: np.ndarray, least: int = 2) -> float | None:
    """Kendall's tau-b of the predictions against the simulation; None below `least` points or when
    either is constant."""
    from scipy import stats as sps

    if predicted.size < least or np.ptp(predicted) == 0 or np.ptp(simulated) == 0:
        return None
    return float(sps.kendalltau(predicted, simulated).statistic)


def near_float(simulated: float, ideal: float, measure: str) -> bool:
    """Whether a point lies within NEAR_FLOAT of the float model (relative for perplexity)."""
    if measure == "perplexity":
        return abs(simulated / ideal - 1.0) <= NEAR_FLOAT[measure]
    return abs(simulated - ideal) <= NEAR_FLOAT[measure]


def region_summary(rows: Sequence[dict[str, Any]], measure: str) -> dict[str, Any]:
    """Count, mean / max absolute error, mean error and Kendall tau (where >= 3 points) of some rows."""
    out: dict[str, Any] = {"points": len(rows), "mean_abs_error": None, "max_abs_error": None,
                           "mean_error": None, "kendall_tau": None}
    if not rows:
        return out
    errors = np.array([r["error"] for r in rows])
    out.update({"mean_abs_error": float(np.abs(errors).mean()), "max_abs_error": float(np.abs(errors).max()),
                "mean_error": float(errors.mean()),
                "kendall_tau": _tau(np.array([r["predicted"] for r in rows]),
                                    np.array([r["simulated"] for r in rows]), least=3)})
    if measure == "perplexity":
        relative = np.array([r["relative_error_pct"] for r in rows])
        out["mean_abs_relative_error_pct"] = float(np.abs(relative).mean())
        out["max_abs_relative_error_pct"] = float(np.abs(relative).max())
    return out


def untrusted_keys(records: Sequence[dict]) -> list[str]:
    """The points whose trust check (an ADC_CHECK record) says the estimate is not to be trusted there."""
    latest = {r["config_key"]: r.get("relative_adc_error") for r in records if r.get("method") == ADC_CHECK}
    return [key for key, ratios in latest.items() if ratios and not trusted(ratios)]


def compare(truth: GroundTruth, records: list[dict], cycle: int, measure: str | None = None,
            fallback: GroundTruth | None = None) -> dict[str, Any]:
    """Per point predicted (mean of the first `cycle` draws) and simulated (mean of chips) value of
    `measure` (default: the one the ground truth was loaded for: top1, loss or perplexity), and the
    summary statistics over the points that have both: overall, per region (near the float model and
    the rest) and the worst points. Predicted and simulated are the same measure, so their correlations
    need no sign change even where lower is better. With `fallback` (chips of the untrusted points, other
    chips than the ground truth's), an untrusted point's prediction is the mean of its fallback chips; its
    row keeps the estimate's as `estimate`, and the summary's "fidelity" compares both."""
    measure = measure or truth.measure
    draws: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get(measure) is not None:
            draws.setdefault(r["config_key"], {})[int(r["draw"])] = float(r[measure])
    ratios = {r["config_key"]: r.get("relative_adc_error") for r in records if r.get("method") == ADC_CHECK}
    ideal = truth.ideal.get(measure) if truth.ideal else (truth.ideal_top1 if measure == "top1" else None)
    simulated_by_key = {} if fallback is None else {
        p.key: list(p.top1 if measure == fallback.measure else p.values.get(measure, [])) for p in fallback.points}
    simulated_by_key = {key: chips for key, chips in simulated_by_key.items() if chips}
    rows = []
    for point in truth.points:
        chips = point.top1 if measure == truth.measure else point.values.get(measure, [])
        have = draws.get(point.key, {})
        used = [have[d] for d in range(cycle) if d in have]
        if not used or not chips or len(chips) != len(point.top1):
            continue
        predicted, simulated = float(np.mean(used)), float(np.mean(chips))
        row = {"point": point.config.describe(), "config_key": point.key,
               "config": point.config.to_dict(), "predicted": predicted, "simulated": simulated,
               "error": predicted - simulated, "abs_error": abs(predicted - simulated),
               "draws": used, "chips": list(chips)}
        if measure == "perplexity":
            row["relative_error_pct"] = 100.0 * (predicted - simulated) / simulated
        if ideal is not None:
            row["region"] = "near_float" if near_float(simulated, ideal, measure) else "rest"
        if ratios.get(point.key):
            row["relative_adc_error"] = max(ratios[point.key].values())
            row["trusted"] = trusted(ratios[point.key])
        row["source"] = "estimate"
        if row.get("trusted") is False and point.key in simulated_by_key:
            fallback_chips = simulated_by_key[point.key]
            row.update({"source": "simulated", "estimate": predicted, "fallback_chips": fallback_chips,
                        "predicted": float(np.mean(fallback_chips))})
            row["error"] = row["predicted"] - simulated
            row["abs_error"] = abs(row["error"])
            if measure == "perplexity":
                row["relative_error_pct"] = 100.0 * row["error"] / simulated
        rows.append(row)
    summary: dict[str, Any] = {"points": len(rows), "ideal_top1": truth.ideal_top1}
    if measure != "top1":
        summary.update({"measure": measure, f"ideal_{measure}": ideal})
    if rows:
        predicted = np.array([r["predicted"] for r in rows])
        simulated = np.array([r["simulated"] for r in rows])
        errors = predicted - simulated
        summary.update({
            "mean_abs_error": float(np.abs(errors).mean()),
            "max_abs_error": float(np.abs(errors).max()),
            "worst_point": rows[int(np.abs(errors).argmax())]["point"],
            # > 0: for top-1 the prediction is optimistic on average, for loss and perplexity pessimistic
            "mean_error": float(errors.mean()),
            "rmse": float(np.sqrt((errors**2).mean())),
        })
        if measure == "perplexity":
            relative = np.array([r["relative_error_pct"] for r in rows])
            summary.update({"mean_abs_relative_error_pct": float(np.abs(relative).mean()),
                            "max_abs_relative_error_pct": float(np.abs(relative).max()),
                            "mean_relative_error_pct": float(relative.mean())})
        tau = _tau(predicted, simulated)
        if tau is not None:
            from scipy import stats as sps

            summary["kendall_tau"] = tau
            summary["spearman"] = float(sps.spearmanr(predicted, simulated).statistic)
            summary["pearson"] = float(sps.pearsonr(predicted, simulated).statistic)
        else:
            summary["kendall_tau"] = summary["spearman"] = summary["pearson"] = None
        # Spread of the simulated chips: the best any predictor of their mean can do is bounded by it.
        chips = [p.top1 for p in truth.points] if measure == truth.measure else [r["chips"] for r in rows]
        chip_sd = [statistics.stdev(c) for c in chips if len(c) > 1]
        summary["mean_chip_std"] = float(np.mean(chip_sd)) if chip_sd else None
    if measure in LOWER_IS_BETTER:
        summary["sign"] = 1
        summary["sign_note"] = (f"lower {measure} is better; predicted and simulated are both {measure}, so "
                                "their correlations need no sign change: agreement is positive")
    width = NEAR_FLOAT[measure]
    summary["regions"] = None if ideal is None or not rows else {
        "definition": (f"near_float: simulated {measure} within "
                       + (f"{100 * width:g}% of" if measure == "perplexity" else f"{width:g} of")
                       + f" the float model's {ideal:.4g}; rest: the other points"),
        "near_float": region_summary([r for r in rows if r["region"] == "near_float"], measure),
        "rest": region_summary([r for r in rows if r["region"] == "rest"], measure)}
    checked = [r for r in rows if "trusted" in r]
    summary["trust"] = None if not checked else {
        "definition": (f"trusted: the estimate's ADC error is at most {TRUST_RATIO:g} of the signal (rms) in "
                       "every layer, on ideal reads and through a programmed chip (nipa.estimation.reliability); "
                       "untrusted: above it in some layer"),
        "ratio": TRUST_RATIO,
        "trusted": region_summary([r for r in checked if r["trusted"]], measure),
        "untrusted": region_summary([r for r in checked if not r["trusted"]], measure),
        "unchecked_points": len(rows) - len(checked)}
    summary["fidelity"] = None if fallback is None else fidelity_summary(rows, fallback, measure)
    worst = sorted(rows, key=lambda r: -r["abs_error"])[:WORST_POINTS]
    summary["worst_points"] = [{name: r[name] for name in ("point", "config_key", "config", "predicted",
                                                           "simulated", "error", "relative_error_pct", "region",
                                                           "relative_adc_error", "trusted", "source", "estimate")
                                if name in r} for r in worst]
    return {"rows": rows, "summary": summary}


def fidelity_summary(rows: Sequence[dict[str, Any]], fallback: GroundTruth, measure: str) -> dict[str, Any]:
    """Adaptive fidelity against the estimate alone: the error over every point both ways, the error at the
    simulated points both ways, and what the simulated chips cost (their recorded seconds)."""
    swapped = [r for r in rows if r["source"] == "simulated"]
    estimate_rows = []
    for r in rows:
        value = r.get("estimate", r["predicted"])
        estimate_rows.append({**r, "predicted": value, "error": value - r["simulated"],
                              **({"relative_error_pct": 100.0 * (value - r["simulated"]) / r["simulated"]}
                                 if measure == "perplexity" else {})})
    swapped_keys = {r["config_key"] for r in swapped}
    chips = [p for p in fallback.points if p.key in swapped_keys]
    return {"untrusted": "simulate", "records": fallback.source, "seed": fallback.run.get("seed"),
            "simulated_points": len(swapped), "estimated_points": len(rows) - len(swapped),
            "chips": int(sum(len(p.top1) for p in chips)),
            "simulated_s": float(sum(np.nansum(p.wall_s) for p in chips)),
            "adaptive": region_summary(rows, measure), "estimate_only": region_summary(estimate_rows, measure),
            "simulated_points_adaptive": region_summary(swapped, measure),
            "simulated_points_estimate": region_summary([r for r in estimate_rows if r["config_key"] in swapped_keys],
                                                        measure)}


# ----------------------------------------------------------------------------------------------------
# Timing both methods in the same run
# ----------------------------------------------------------------------------------------------------


def timing_sample(points: Sequence[PointTruth], n: int) -> list[PointTruth]:
    """`n` points spread evenly over the recorded order (deterministic)."""
    if n <= 0 or not points:
        return []
    if n >= len(points):
        return list(points)
    index = np.unique(np.linspace(0, len(points) - 1, n).round().astype(int))
    return [points[i] for i in index]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(points: Sequence[PointTruth], fast: FastMethod, model: nn.Module, data, calib_data,
                 device: torch.device, cycle: int, memory_mb: float, run: dict[str, Any],
                 calibration_factory: Callable[[], AdcCalibration] | None,
                 log: Callable[[str], None] = print,
                 all_points: Sequence[PointTruth] = ()) -> dict[str, Any]:
    """Wall-clock of both methods per point, interleaved, same data, batch size and device.

    fast: `cycle` draws (conversion included). Its ADC calibration (adc="measured") is timed from
    scratch for the point's (wl_weight, subArray, cellBit, wl_input, ADC mode), all the ADC
    resolutions of `all_points` that share it included, and reported apart: that one pass serves all
    those points. ground truth: `cycle` chips through `nipa.simulator.crossbar.convert` (conversion and
    programming included), as main.py runs them.
    """
    rows = []
    # Which points one calibration pass serves (the simulator's activations: one ADC resolution only).
    share_key = calibration_factory().pass_key if calibration_factory is not None else AdcCalibration.key_of
    for point in points:
        calib_s = 0.0
        if calibration_factory is not None:
            # From scratch, for every ADC resolution that shares this point's calibration pass.
            fresh = calibration_factory()
            fresh.prefetch(p.config for p in all_points if share_key(p.config) == share_key(point.config))
            fast.calibration = fresh
            _synchronize(device)
            started = time.perf_counter()
            fast.calibrate(point.config)  # what the method's form needs (planes, conditional), so the
            _synchronize(device)          # draws below measure nothing more
            calib_s = time.perf_counter() - started
        _synchronize(device)
        started = time.perf_counter()
        fast_results = fast.draws(point.config, range(cycle), data)
        _synchronize(device)
        fast_s = time.perf_counter() - started

        started = time.perf_counter()
        converted = None
        sim_top1 = []
        for chip in range(cycle):
            converted = convert(model, point.config, exclude=run.get("exclude", ()),
                                include=run.get("include"), seed=run.get("seed", 0), chip=chip,
                                per_read=run.get("per_read", False), memory_mb=memory_mb,
                                compat=Compat(**{name: True for name in run.get("compat", [])})).to(device).eval()
            if point.config.adc_mode == "calibrated":
                calibrate_adc(converted, (x.to(device) for x in calib_data))
            sim_top1.append(evaluate(converted, data, device)["top1"])
        _synchronize(device)
        sim_s = time.perf_counter() - started
        del converted
        release_workspaces()
        key = share_key(point.config)
        sharing = sum(share_key(p.config) == key for p in all_points)
        rows.append({"point": point.config.describe(), "config_key": point.key, "fast_s": fast_s,
                     "points_sharing_calibration": max(1, sharing),
                     "calibration_s": calib_s, "simulated_s": sim_s, "speedup": sim_s / fast_s,
                     "speedup_with_calibration": sim_s / (fast_s + calib_s),
                     "fast_top1": [m["top1"] for _, m, _ in fast_results], "simulated_top1": sim_top1,
                     "recorded_simulated_s": float(np.nansum(point.wall_s[:cycle]))})
        log(f"timing {point.config.describe()}: fast {fast_s:.2f}s (+ calibration {calib_s:.2f}s), "
            f"simulated {sim_s:.2f}s, speedup {sim_s / fast_s:.1f}x")
    if not rows:
        return {"points": 0}
    fast_total = sum(r["fast_s"] for r in rows)
    calib_total = sum(r["calibration_s"] for r in rows)
    sim_total = sum(r["simulated_s"] for r in rows)
    return {"points": len(rows), "cycle": cycle, "rows": rows, "fast_s": fast_total,
            "calibration_s": calib_total, "simulated_s": sim_total, "speedup": sim_total / fast_total,
            "speedup_with_calibration": sim_total / (fast_total + calib_total),
            "median_speedup": float(np.median([r["speedup"] for r in rows]))}


def amortized_speedup(timing: dict[str, Any]) -> float | None:
    """Speedup over the grid when each calibration pass is shared by the points it serves:
    sum of simulated s / sum of (fast s + calibration s / points sharing that calibration)."""
    if not timing.get("points"):
        return None
    rows = timing["rows"]
    fast = sum(r["fast_s"] + r["calibration_s"] / r["points_sharing_calibration"] for r in rows)
    return float(sum(r["simulated_s"] for r in rows) / fast)


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------


def _region_line(name: str, region: dict[str, Any]) -> str:
    if not region["points"]:
        return f"  {name:<10} 0 points"
    tau = region["kendall_tau"]
    relative = (f" ({region['mean_abs_relative_error_pct']:.2f}% / {region['max_abs_relative_error_pct']:.2f}%)"
                if "mean_abs_relative_error_pct" in region else "")
    return (f"  {name:<10} {region['points']:>4} points: mean |error| {region['mean_abs_error']:.3f}, max |error| "
            f"{region['max_abs_error']:.3f}{relative}, mean error {region['mean_error']:+.3f}, Kendall tau "
            + ("n/a (< 3 points or constant)" if tau is None else f"{tau:.3f}"))


def format_table(comparison: dict[str, Any]) -> str:
    lines = [f"{'hardware point':64s} {'predicted':>9s} {'simulated':>9s} {'error':>7s}"]
    for r in comparison["rows"]:
        swapped = (f"  simulated: {len(r['fallback_chips'])} other chips (the estimate said {r['estimate']:.2f})"
                   if r.get("source") == "simulated" else "")
        lines.append(f"{r['point']:64s} {r['predicted']:9.2f} {r['simulated']:9.2f} {r['error']:+7.2f}{swapped}")
    s = comparison["summary"]
    if s.get("points"):
        tau = s.get("kendall_tau")
        measure = s.get("measure", "top1")
        lines.append(f"{s['points']} points{'' if measure == 'top1' else f' ({measure})'}: mean |error| "
                     f"{s['mean_abs_error']:.3f}, max |error| "
                     f"{s['max_abs_error']:.3f} ({s['worst_point']}), mean error {s['mean_error']:+.3f}, "
                     f"Kendall tau {'n/a' if tau is None else f'{tau:.3f}'}")
        if "mean_abs_relative_error_pct" in s:
            lines.append(f"relative error: mean |error| {s['mean_abs_relative_error_pct']:.2f}%, max "
                         f"{s['max_abs_relative_error_pct']:.2f}%, mean {s['mean_relative_error_pct']:+.2f}%")
        if s.get("sign_note"):
            lines.append(f"sign {s['sign']}: {s['sign_note']}")
        if s.get("regions"):
            lines.append(f"per region ({s['regions']['definition']}):")
            lines += [_region_line(name, s["regions"][name]) for name in ("near_float", "rest")]
        if s.get("trust"):
            lines.append(f"per trust ({s['trust']['definition']}):")
            lines += [_region_line(name, s["trust"][name]) for name in ("trusted", "untrusted")]
        if s.get("fidelity"):
            f = s["fidelity"]
            lines.append(f"adaptive fidelity: {f['simulated_points']} untrusted points simulated on {f['chips']} chips "
                         f"(seed {f['seed']}, other chips than the ground truth's; {f['simulated_s']:.1f} s), "
                         f"{f['estimated_points']} estimated:")
            lines += [_region_line("adaptive", f["adaptive"]), _region_line("estimate", f["estimate_only"]),
                      "  at the simulated points:", _region_line("adaptive", f["simulated_points_adaptive"]),
                      _region_line("estimate", f["simulated_points_estimate"])]
        if s.get("worst_points"):
            lines.append(f"the {len(s['worst_points'])} largest errors:")
            for w in s["worst_points"]:
                relative = f" ({w['relative_error_pct']:+.2f}%)" if "relative_error_pct" in w else ""
                trust = ("" if "trusted" not in w else
                         f"  ADC error/signal {w['relative_adc_error']:.3f}{'' if w['trusted'] else ' (untrusted)'}")
                source = "  (simulated)" if w.get("source") == "simulated" else ""
                lines.append(f"  {w['point']:64s} predicted {w['predicted']:8.2f} simulated {w['simulated']:8.2f} "
                             f"error {w['error']:+7.2f}{relative}{trust}{source}")
    return "\n".join(lines)


def plot(comparison: dict[str, Any], path: str | Path, title: str) -> Path:
    """Predicted against simulated accuracy, one dot per point, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    predicted = [r["predicted"] for r in rows]
    simulated = [r["simulated"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 5))
    trust = comparison["summary"].get("trust")
    if trust:  # trusted points as dots, the others as crosses (nipa.estimation.reliability)
        for wanted, marker, color, name in ((True, "o", "C0", "trusted"), (False, "x", "C3", "untrusted")):
            chosen = [r for r in rows if r.get("trusted") is wanted and r.get("source") != "simulated"]
            if chosen:
                ax.scatter([r["simulated"] for r in chosen], [r["predicted"] for r in chosen], s=18, alpha=0.8,
                           marker=marker, color=color,
                           label=f"{name} (ADC error {'<=' if wanted else '>'} {trust['ratio']:g} of signal)")
        swapped = [r for r in rows if r.get("source") == "simulated"]
        if swapped:  # where the prediction is other chips of the simulator, and where the estimate was
            ax.scatter([r["simulated"] for r in swapped], [r["predicted"] for r in swapped], s=30,
                       facecolors="none", edgecolors="C2", label="untrusted, simulated (other chips)")
            ax.scatter([r["simulated"] for r in swapped], [r["estimate"] for r in swapped], s=10, marker=".",
                       color="0.6", label="  their estimate")
        unchecked = [r for r in rows if "trusted" not in r]
        if unchecked:
            ax.scatter([r["simulated"] for r in unchecked], [r["predicted"] for r in unchecked], s=18, alpha=0.8,
                       color="0.5", label="not checked")
    else:
        ax.scatter(simulated, predicted, s=18, alpha=0.8)
    if rows:
        lo = min(min(predicted), min(simulated)) - 0.5
        hi = max(max(predicted), max(simulated)) + 0.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(loc="upper left", fontsize=8)
    s = comparison["summary"]
    if s.get("points"):
        tau = s.get("kendall_tau")
        trusted_line = ""
        if trust and trust["trusted"]["points"]:
            t = trust["trusted"]
            trusted_line = f"\ntrusted {t['points']}: MAE {t['mean_abs_error']:.2f}, max {t['max_abs_error']:.2f}"
        if s.get("fidelity"):
            e = s["fidelity"]["estimate_only"]
            trusted_line += (f"; {s['fidelity']['simulated_points']} simulated\n(estimate alone: MAE "
                             f"{e['mean_abs_error']:.2f}, max {e['max_abs_error']:.2f})")
        ax.set_title(f"{title}\nMAE {s['mean_abs_error']:.2f}, max {s['max_abs_error']:.2f}, "
                     f"tau {'n/a' if tau is None else f'{tau:.2f}'}, {s['points']} points{trusted_line}", fontsize=9)
    measure = s.get("measure", "top1")
    label = "top-1 (%)" if measure == "top1" else f"{measure} (lower is better)"
    ax.set_xlabel(f"simulated {label} (bit-and-crossbar slicing, mean of chips)")
    ax.set_ylabel(f"predicted {label} (error injection, mean of draws)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
