"""wrap_error.py's pipeline: the fast estimate (nipa.pipelines.wrap) of every point of a ground truth, compared with it.

`run_wrap_error(WrapErrorSettings(...))` reads main.py's records (nipa.results.ground_truth), loads the model and
data of the workload, checks that the ground truth, the statistics and the weights belong together,
evaluates `cycle` injection draws per point (resumable records), compares them with the simulated chips,
times both methods on a sample of points in the same run, and writes the summary JSON and the plot
({records stem}[_{method}][_{measure}]_summary.json, nipa.paths.summary_stem).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nipa import paths
from nipa.errors import UserError
from nipa.estimation.inject import (
    DEFAULT_CALIB_BATCHES,
    DEFAULT_METHOD,
    AdcCalibration,
    InjectionModel,
    calibration_upstream,
)
from nipa.pipelines.wrap import (
    FALLBACK_SEED_OFFSET,
    UNTRUSTED,
    FastMethod,
    WrapSettings,
    amortized_speedup,
    cached_batches,
    check_statistics,
    compare,
    format_table,
    load_ground_truth,
    plot,
    run_fast,
    time_methods,
    timing_sample,
    untrusted_keys,
)
from nipa.results.ground_truth import GroundTruth
from nipa.results.records import check_results_path, environment, read_records, timestamp
from nipa.workloads.zoo import dataset_id, model_id, results_path

if TYPE_CHECKING:
    from nipa.workloads.workload import Workload


@dataclass
class WrapErrorSettings:
    """What wrap_error.py is asked (its options, by the same names). Not to be confused with
    nipa.pipelines.wrap.WrapSettings, the fast method's settings stored with each record."""

    model_name: str = "smallcnn"
    dataset: str = "mnist5k"
    cycle: int = 3  # injection draws per point (at least, with target_se)
    target_se: float | None = None  # add draws until the standard error of their mean is at most this
    max_cycle: int | None = None  # at most this many draws per point with target_se (default 10 x cycle)
    method: str = DEFAULT_METHOD
    default_method: str = DEFAULT_METHOD  # the method whose files carry no method name
    device_error: str | None = None
    adc_error: str | None = None
    adc_form: str | None = None
    tile_factor: str = "tiles"
    calib_batches: int = DEFAULT_CALIB_BATCHES
    calib_upstream: str | None = None  # None: the form's (calibration_upstream)
    measure: str = "top1"
    # "simulate": the points the trust check does not trust get chips of the simulator instead (other chips
    # than the ground truth's; nipa.pipelines.wrap.FALLBACK_SEED_OFFSET), as many as the draws.
    untrusted: str = "estimate"
    paired_chips: bool = False
    time_points: int = 5
    memory_mb: float | None = None  # default: sized for the device
    ground_truth: str | None = None  # default results/{model}/{dataset}_accsim.jsonl
    stats: str | None = None  # default results/stats/{model}_{dataset}.json
    out: str | None = None  # default results/{model}/{dataset}_wrap.jsonl
    plot: str | None = None  # default <out stem>.png
    batch_size: int | None = None  # default: the ground truth's
    limit: int | None = None  # default: the ground truth's
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    gpu_id: int | None = None
    ckpt_dir: str = "ckpts"
    ckpt: str | None = None
    # The model and data (nipa.workloads.workload.Workload); None: from the fields above.
    workload: Workload | None = None


def _stats_hint(truth: GroundTruth, model_name: str, dataset: str) -> str:
    hw_files = sorted({r.get("hw_file") for r in read_records(truth.source) if r.get("hw_file")})
    return (f"python stat.py --model_name {model_name} --dataset {dataset} "
            f"--HWdes {' '.join(hw_files) or 'HW_config/Search_space.ini'}")


def run_wrap_error(settings: WrapErrorSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """wrap_error.py after argument parsing: predictions, comparison, timing, summary and plot; `log`
    receives the progress and report lines. Returns the summary (also written as JSON)."""
    from nipa.estimation.stats import check_stats_weights, load_statistics
    from nipa.hardware.mapping import select_layers
    from nipa.llm.load import is_llm_name
    from nipa.runtime import default_memory_mb, resolve_device, seed_everything
    from nipa.workloads.workload import Workload, check_workload
    from nipa.workloads.zoo import statistics_path, weights_file, weights_sha256

    errors = InjectionModel.of(settings.method, settings.device_error, settings.adc_error, settings.tile_factor,
                               settings.adc_form)
    truth_path = Path(settings.ground_truth or results_path(settings.model_name, settings.dataset, "accsim"))
    measure = settings.measure
    if settings.untrusted not in UNTRUSTED:
        raise UserError(f"--untrusted {settings.untrusted!r}: must be one of {', '.join(UNTRUSTED)}")
    if settings.untrusted == "simulate" and errors.adc != "measured":
        raise UserError(f"--untrusted simulate: the method {settings.method!r} (ADC error {errors.adc}) has no trust "
                        "check, which needs a measured ADC error (nipa.estimation.reliability)")
    # says which main.py run makes it
    truth = load_ground_truth(truth_path, settings.model_name, settings.dataset, measure)
    workload = settings.workload or Workload.from_args(settings)  # the model and data, resolved once
    description = workload.describe()
    check_workload([r for r in read_records(truth_path) if r.get("method") == "sliced"], description, truth_path,
                   "give the ground truth of this model and data with --ground_truth")
    run = truth.run
    # The ground truth's data: its batch size (which sets the dynamic ADC ranges) and test subset.
    batch_size = settings.batch_size or run.get("batch_size", 256)
    limit = settings.limit if settings.limit is not None else run.get("limit")
    if batch_size != run.get("batch_size", batch_size) or limit != run.get("limit"):
        log(f"note: the ground truth ran with batch_size={run.get('batch_size')}, limit={run.get('limit')}; "
            f"this run uses batch_size={batch_size}, limit={limit}")
    exclude, include = run.get("exclude", []), run.get("include")
    stats = None
    if errors.device == "formula" or errors.adc == "formula":
        stats_path = Path(settings.stats or statistics_path(settings.model_name, settings.dataset))
        if not stats_path.is_file():
            raise FileNotFoundError(f"bit statistics {stats_path} do not exist; compute them with\n    "
                                    + _stats_hint(truth, settings.model_name, settings.dataset))
        stats = load_statistics(stats_path)
    out = check_results_path(settings.out or results_path(settings.model_name, settings.dataset, "wrap"))

    name = settings.model_name

    def check_weights(weights: str) -> None:
        """The ground truth and the statistics must come from the weights this run loads."""
        if weights is not None and run.get("weights") not in (None, weights):
            raise UserError(f"{truth.source} was simulated with other weights (sha256 {run['weights'][:12]}) "
                            f"than {weights_file(name, settings.dataset, settings.ckpt_dir, settings.ckpt)} "
                            f"(sha256 {weights[:12]}); give the ground truth's --ckpt, or simulate these weights")
        if stats is not None:
            check_stats_weights(stats, weights, stats_path, log)

    check_workload([r for r in read_records(out) if r.get("method") == "fast"], description, out)
    if not is_llm_name(settings.model_name):  # a CNN's checkpoint is checked before anything is loaded
        check_weights(workload.weights_sha256())
    device = resolve_device(settings.device, settings.gpu_id)
    memory_mb = settings.memory_mb if settings.memory_mb is not None else default_memory_mb(device)
    seed_everything(settings.seed)
    model, meta, loader = workload.load(device=device, batch_size=batch_size, num_workers=settings.num_workers,
                                        limit=limit)
    if is_llm_name(settings.model_name):
        check_weights(weights_sha256(weights_file(settings.model_name, settings.dataset, metadata=meta)))
    if stats is not None:
        check_statistics(stats, [p.config for p in truth.points], settings.model_name, settings.dataset,
                         select_layers(model, exclude=exclude, include=include))
    data = cached_batches(loader, device)

    calib_data: list[torch.Tensor] = []
    if errors.adc == "measured" or any(p.config.adc_mode == "calibrated" for p in truth.points):
        # A CNN's training data, never its test set: the ADC error is a property of the layer inputs'
        # statistics. An LLM's task items (its only data).
        calib_data = workload.calibration_inputs(loader, settings.calib_batches, batch_size=batch_size,
                                                 seed=settings.seed)

    upstream = calibration_upstream(errors, settings.calib_upstream)

    def new_calibration() -> AdcCalibration:
        return AdcCalibration(model, calib_data, exclude=exclude, include=include, memory_mb=memory_mb,
                              seed=settings.seed, upstream=upstream)

    fast_settings = WrapSettings(model_name=settings.model_name, dataset=settings.dataset, cycle=settings.cycle,
                                 target_se=settings.target_se,
                                 max_cycle=settings.max_cycle or 10 * settings.cycle,
                                 seed=settings.seed, errors=errors, calib_batches=settings.calib_batches,
                                 calib_upstream=upstream,
                                 exclude=exclude, include=include, batch_size=batch_size, limit=limit,
                                 paired=settings.paired_chips, workload=description,
                                 test_order=truth.run.get("test_order", "fixed"))
    fast = FastMethod(model, fast_settings, stats, new_calibration() if errors.adc == "measured" else None, device)
    own_upstream = upstream == calibration_upstream(errors)
    label = (errors.label() + ("" if own_upstream else f", calibrated on the {upstream} activations")
             + (", paired chips (diagnostic)" if settings.paired_chips else ""))
    each = (f"{settings.cycle} draws each" if settings.target_se is None else
            f"{settings.cycle} to {fast_settings.most_draws} draws each (standard error <= {settings.target_se})")
    log(f"{len(truth.points)} hardware points from {truth.source}; injection {label}, {each} -> {out}")
    records = run_fast(truth, fast, data, out, log)
    fallback = None
    if settings.untrusted == "simulate":
        fallback = simulate_untrusted(truth, untrusted_keys(records), model, loader, data, workload, device,
                                      memory_mb, out, fast_settings, log)

    comparison = compare(truth, records, fast_settings.most_draws, fallback=fallback)
    log(format_table(comparison))
    # The test loss beside top-1 (CNNs, multiple-choice tasks): a continuous second measure.
    loss_beside = None
    if measure == "top1" and all(len(p.values.get("loss", [])) == len(p.top1) for p in truth.points):
        loss_beside = compare(truth, records, fast_settings.most_draws, "loss", fallback=fallback)["summary"]
        if loss_beside.get("points"):
            tau = loss_beside.get("kendall_tau")
            log(f"test loss beside top-1: mean |error| {loss_beside['mean_abs_error']:.4f} nats, max "
                f"{loss_beside['max_abs_error']:.4f}, mean error {loss_beside['mean_error']:+.4f}, Kendall tau "
                f"{'n/a' if tau is None else f'{tau:.3f}'} (float model {truth.ideal.get('loss') or math.nan:.4f})")
    sample = timing_sample(truth.points, settings.time_points)
    if sample:
        log(f"timing both methods on {len(sample)} of {len(truth.points)} points "
            f"({settings.cycle} draws / chips each, same data, batch size and device)")
    timing = time_methods(sample, fast, model, data, calib_data, device, settings.cycle, memory_mb, run,
                          new_calibration if errors.adc == "measured" else None, log, truth.points)
    if timing.get("points"):
        timing["speedup_amortized_over_grid"] = amortized_speedup(timing)
        timing["note"] = (f"both methods timed in this run on {timing['points']} of {len(truth.points)} "
                          "points; a calibration pass is shared by every point with the same (wl_weight, "
                          "subArray, cellBit, wl_input, ADC mode)")
        log(f"speedup on {timing['points']} points: {timing['speedup']:.1f}x without the ADC calibration, "
            f"{timing['speedup_amortized_over_grid']:.1f}x with each calibration shared by its points, "
            f"{timing['speedup_with_calibration']:.1f}x with a fresh calibration for every point")
    slug = (errors.slug() + ("" if own_upstream else f"-{upstream}")
            + ("-paired" if settings.paired_chips else ""))
    stem = paths.summary_stem(out, "_".join(part for part in ("" if slug == settings.default_method else slug,
                                                              "" if fallback is None else "adaptive",
                                                              "" if measure == "top1" else measure) if part))
    summary = {"model": model_id(settings.model_name), "dataset": dataset_id(settings.model_name, settings.dataset),
               "injection": label,
               "method": settings.method, "untrusted": settings.untrusted, "cycle": settings.cycle,
               "target_se": settings.target_se,
               "max_cycle": fast_settings.most_draws, "ground_truth": truth.source, "records": str(out),
               "batch_size": batch_size, "limit": limit, **comparison["summary"], "timing": timing,
               "recorded_simulated_s_per_point": float(np.nanmean([np.nansum(p.wall_s)
                                                                   for p in truth.points])),
               "rows": comparison["rows"], "loss_beside_top1": loss_beside, "time": timestamp(),
               "device": str(device),
               "torch_threads": torch.get_num_threads(), **environment()}
    summary_path = Path(f"{stem}_summary.json")
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    figure = plot(comparison, settings.plot or Path(f"{stem}.png"),
                  f"{model_id(settings.model_name)} / {dataset_id(settings.model_name, settings.dataset)}: {label}")
    log(f"summary {summary_path}, plot {figure}")
    return summary


def fallback_path(out: Path) -> Path:
    """Where the simulated chips of the untrusted points go: beside the estimate's records."""
    return out.with_name(f"{out.stem}_untrusted_accsim{out.suffix}")


def simulate_untrusted(truth: GroundTruth, keys: Sequence[str], model, loader, data, workload: Workload, device,
                       memory_mb: float, out: Path, fast_settings: WrapSettings,
                       log: Callable[[str], None] = print) -> GroundTruth:
    """Adaptive fidelity: the points `keys` (the untrusted ones) simulated with the ground truth's settings
    but the seed FALLBACK_SEED_OFFSET above its own, so other chips, as many as the estimate's draws (with a
    target standard error, chips until it, at most its max draws). The records are what main.py would write
    for those points with that seed; an interrupted run resumes. Returns their view as a ground truth."""
    from nipa.hardware.compat import Compat
    from nipa.pipelines.sweep import SweepSettings, simulate_to_target

    run = truth.run
    seed = int(run.get("seed", 0)) + FALLBACK_SEED_OFFSET
    wanted = set(keys)
    points = [p.config for p in truth.points if p.key in wanted]
    path = fallback_path(out)
    hw_files = sorted({r.get("hw_file") for r in read_records(truth.source) if r.get("hw_file")})
    base = SweepSettings(model_name=fast_settings.model_name, dataset=fast_settings.dataset,
                         hw_file=",".join(hw_files) or "?", sample_num=0, cycle=fast_settings.cycle, seed=seed,
                         batch_size=run.get("batch_size", fast_settings.batch_size), limit=run.get("limit"),
                         exclude=list(run.get("exclude", [])), include=run.get("include"),
                         per_read=bool(run.get("per_read", False)), calib_batches=int(run.get("calib_batches", 4)),
                         memory_mb=memory_mb, points=points, weights=run.get("weights"),
                         compat=Compat.parse(",".join(run.get("compat") or [])), device=str(device),
                         test_order=run.get("test_order", "fixed"),
                         extra={"fallback_for": truth.source, "estimate_records": str(out),
                                **({"workload": fast_settings.workload} if fast_settings.workload else {})})
    calib_inputs = []
    if any(p.adc_mode == "calibrated" for p in points):
        calib_inputs = workload.calibration_inputs(loader, base.calib_batches, batch_size=base.batch_size, seed=seed)
    log(f"adaptive fidelity: {len(points)} of {len(truth.points)} points untrusted, simulated with seed {seed} "
        f"(other chips than the ground truth's) -> {path}")
    if not points:
        return GroundTruth(ideal_top1=None, points=[], run=base.signature(), source=str(path), measure=truth.measure)
    target = fast_settings.target_se if fast_settings.target_se is not None else math.inf
    grouped = simulate_to_target(base, model, data, calib_inputs, device, path, fast_settings.cycle,
                                 fast_settings.most_draws, target, log)
    return GroundTruth.of(grouped, truth.measure, str(path))
