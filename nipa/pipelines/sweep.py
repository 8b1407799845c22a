"""The ground-truth sweep of main.py: every hardware point, `cycle` chips each, one record per chip.

`run_sweep(SweepSettings, model, ...)` sweeps a loaded model (explore.py --verify calls it too);
`run_sweep_job(MainSettings)` is main.py's whole job: the checks before any work, the workload, the mapped
layers, then run_sweep into the results file.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nipa.errors import UserError
from nipa.hardware.compat import NO_COMPAT, Compat
from nipa.hardware.config import (
    HWConfig,
    PerLayerConfig,
    SearchSpace,
    check_layer_patterns,
    layered,
    parse_layer_overrides,
)
from nipa.results.records import (
    SWEEP_KEY,
    RecordWriter,
    check_results_path,
    done_keys,
    environment,
    read_records,
    shard_path,
    timestamp,
)
from nipa.runtime import device_signature
from nipa.simulator.crossbar import calibrate_adc, compile_mode, convert, mapped_layer_names, product_mode, program_chip
from nipa.simulator.evaluate import TEST_ORDERS, chip_order, describe_metrics, evaluate, resident_batches
from nipa.workloads.workload import UserWorkloadOptions
from nipa.workloads.zoo import dataset_id, model_id

# The simulator's numeric semantics: 1 = an ADC range per tile in `dynamic` mode (before 2026-12),
# 2 = one range per layer, input bit and slice over every tile (SPEC section 4, step 6).
SIMULATOR_VERSION = 2


def identical_chips(point: HWConfig | PerLayerConfig, test_order: str) -> bool:
    """Whether every chip of `point` gives the same result: no device error, and every chip reading the
    test set in one order or an ADC whose range does not depend on the batch."""
    return not point.has_device_error and (test_order == "fixed" or not point.batch_dependent)


@dataclass
class SweepSettings:
    """Everything that decides a sweep's numbers; stored with each record."""

    model_name: str
    dataset: str
    hw_file: str
    sample_num: int = 200
    cycle: int = 3
    seed: int = 0
    batch_size: int = 256
    limit: int | None = None
    exclude: Sequence[str] = ()
    include: Sequence[str] | None = None
    adc_mode: str | None = None  # overrides the INI's ADC mode when set
    per_read: bool = False
    calib_batches: int = 4
    memory_mb: float = 256
    shard: tuple[int, int] | None = None
    # Explicit points to simulate instead of sampling hw_file (explore.py --verify); hw_file is then only
    # recorded as where they came from.
    points: Sequence[HWConfig] | None = None
    # A point without device error gives every chip the same result (nothing is drawn): chips after the
    # first are recorded as copies of it, marked `copied_from_chip`, unless this is False.
    copy_identical_chips: bool = True
    # sha256 of the weights (nipa.workloads.zoo.weights_sha256): records of other weights never join a sweep.
    weights: str | None = None
    # The original tool's choices the simulator reproduces (--compat; nipa.hardware.compat).
    compat: Compat = NO_COMPAT
    # Per-layer overrides ({layer pattern: {field: value}}, nipa.hardware.config.layered) applied to every
    # sampled point.
    layer_overrides: dict[str, dict[str, int]] | None = None
    # The device the chips are simulated on ("cpu", "cuda:0"): its type and GPU model are settings, since
    # per-read draws and float rounding differ between devices (run_sweep sets it to its own device).
    device: str = "cpu"
    # "per_chip": chip c > 0 reads the test set in its own order (nipa.simulator.evaluate.chip_order), so at a
    # batch-dependent point (a dynamic ADC range) the chips' spread holds the batch composition too.
    test_order: str = "fixed"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.test_order not in TEST_ORDERS:
            raise UserError(f"test order {self.test_order!r}: must be one of {', '.join(TEST_ORDERS)}")

    def identical_chips(self, point: HWConfig | PerLayerConfig) -> bool:
        return identical_chips(point, self.test_order)

    @property
    def per_layer(self) -> bool:
        """Whether the sweep's points give some layers their own configuration."""
        return bool(self.layer_overrides) or any(isinstance(p, PerLayerConfig) for p in self.points or ())

    def signature(self) -> dict[str, Any]:
        """The settings two records must share to belong to one sweep (the points may differ)."""
        return {"model": model_id(self.model_name), "dataset": dataset_id(self.model_name, self.dataset),
                "seed": self.seed,
                "batch_size": self.batch_size, "limit": self.limit, "exclude": list(self.exclude),
                "include": None if self.include is None else list(self.include),
                "per_read": self.per_read or self.compat.per_read, "calib_batches": self.calib_batches,
                "weights": self.weights, "compat": self.compat.switches,
                # A sweep of per-layer points never shares a results file with a uniform one.
                **({"per_layer": True} if self.per_layer else {}),
                # Named only when not the file's order, so sweeps from before the option still resume.
                **({"test_order": self.test_order} if self.test_order != "fixed" else {}),
                # Records of a simulator whose numbers differ for the same settings never mix.
                "simulator": SIMULATOR_VERSION, **device_signature(self.device)}


def sweep_points(settings: SweepSettings) -> list[HWConfig | PerLayerConfig]:
    """The points of this sweep (and shard), in a stable order."""
    if settings.points is not None:
        points = list(dict.fromkeys(settings.points))
    else:
        space = SearchSpace.from_ini(settings.hw_file)
        points = space.sample(settings.sample_num, seed=settings.seed)
    if settings.adc_mode:
        points = list(dict.fromkeys(dataclasses.replace(p, adc_mode=settings.adc_mode) for p in points))
    if settings.layer_overrides:
        points = list(dict.fromkeys(layered(p, settings.layer_overrides) for p in points))
    if settings.shard:
        index, count = settings.shard
        points = points[index::count]
    return points


def check_compatible(existing: list[dict], settings: SweepSettings, path: Path) -> None:
    """Refuse to mix records of a sweep with other settings into one results file."""
    wanted = settings.signature()
    for number, record in enumerate(existing, 1):
        have = record.get("run")
        if not isinstance(have, dict) or "method" not in record:
            raise UserError(f"{path}: record {number} is not a record of main.py (no 'run' settings or "
                            "'method'); give main.py its own results file with --out")
        # Records written before the device was a setting have no device_type. The ones in use were all
        # simulated on CPUs (sweeps running when it was added), so a missing one counts as "cpu": those
        # sweeps still resume on a CPU. (An older GPU sweep then reads as a CPU one: resume it with --out.)
        have = {"device_type": "cpu", **have}
        if have.get("simulator") != wanted["simulator"]:
            raise UserError(f"{path}: record {number} comes from an earlier simulator (before the dynamic ADC "
                            "range spanned every tile of a layer, SPEC section 4); its numbers differ from "
                            "today's: pass --out for a new results file")
        device_keys = ("device_type", "gpu_name")
        if any(have.get(k) != wanted.get(k) for k in device_keys):
            def name(sig: dict) -> str:
                return sig["device_type"] + (f" ({sig['gpu_name']})" if sig.get("gpu_name") else "")

            raise UserError(f"{path}: record {number} was simulated on {name(have)}, this run is on "
                            f"{name(wanted)}; draws and rounding differ between devices, so one sweep runs on "
                            "one kind of device: pass its --device, or --out for a new results file")
        if have != wanted:
            diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
            raise UserError(f"{path} already holds records of a sweep with other settings "
                            f"(field: (in file, now) {diff}); pass --out for a new results file, or the "
                            "settings of the file's sweep to resume it")


def run_sweep(settings: SweepSettings, model: nn.Module, test_loader, calib_inputs: Sequence[torch.Tensor],
              device: torch.device,
              out_path: str | Path, writer: RecordWriter, log: Callable[[str], None] = print) -> list[dict]:
    """Evaluate the ideal model (once) and every hardware point on `cycle` chips. Records already in
    the results file are skipped, so an interrupted sweep resumes where it stopped. Returns the new
    records."""
    settings = dataclasses.replace(settings, device=str(device))  # the device that runs is the one recorded
    existing = read_records(out_path)
    check_compatible(existing, settings, Path(out_path))
    # A test set that fits stays on the device: read and copied once, not once per chip.
    test_loader = resident_batches(test_loader, device)
    done = done_keys(existing, SWEEP_KEY)
    points = sweep_points(settings)
    common = {"model": model_id(settings.model_name), "dataset": dataset_id(settings.model_name, settings.dataset),
              "seed": settings.seed,
              "run": settings.signature(), "hw_file": settings.hw_file, **settings.extra}
    written: list[dict] = []
    bookkeeping = set(common) | set(environment()) | {"method", "config", "config_key", "chip", "mapped_layers",
                                                      "copied_from_chip", "wall_s", "device", "time", "kernels",
                                                      "memory_mb"}
    # Chip 0 of every point, to copy for the chips of points without device error.
    first_chips = {r["config_key"]: r for r in existing if r.get("method") == "sliced" and r.get("chip") == 0}

    def record(method: str, metrics: dict, seconds: float, **fields) -> None:
        # How the simulator ran (compiled kernels or eager, the memory budget): bookkeeping, not settings,
        # since either gives the same numbers up to float rounding.
        entry = {**common, "method": method, **fields, **metrics, "wall_s": round(seconds, 4),
                 "device": str(device), "time": timestamp(), "kernels": compile_mode(),
                 "products": product_mode(), "memory_mb": settings.memory_mb, **environment()}
        writer.append(entry)
        written.append(entry)

    if ("ideal", None, None) not in done and (settings.shard is None or settings.shard[0] == 0):
        started = time.perf_counter()
        metrics = evaluate(model, test_loader, device, progress=True, desc="ideal")
        record("ideal", metrics, time.perf_counter() - started, config=None, config_key=None, chip=None)
        log(f"ideal (float) model: {describe_metrics(metrics)}")

    todo = [(p, c) for p in points for c in range(settings.cycle) if ("sliced", p.key(), c) not in done]
    skipped = len(points) * settings.cycle - len(todo)
    log(f"{len(points)} hardware points x {settings.cycle} chips from {settings.hw_file}"
        + (f" (shard {settings.shard[0]}/{settings.shard[1]})" if settings.shard else "")
        + (f"; {skipped} already recorded, resuming" if skipped else ""))
    converted, converted_point = None, None
    for point, chip in tqdm(todo, desc="sweep", unit="chip"):
        started = time.perf_counter()
        source = first_chips.get(point.key()) if chip > 0 and settings.copy_identical_chips \
            and settings.identical_chips(point) else None
        if source is not None:
            metrics = {k: v for k, v in source.items() if k not in bookkeeping}
            record("sliced", metrics, 0.0, config=point.to_dict(), config_key=point.key(), chip=chip,
                   mapped_layers=source.get("mapped_layers"), copied_from_chip=0)
            log(f"{point.describe()}  chip {chip}: {describe_metrics(metrics)}  (no device error: chip 0's result)")
            continue
        if point != converted_point:
            converted = convert(model, point, exclude=settings.exclude, include=settings.include,
                                seed=settings.seed, chip=chip, per_read=settings.per_read,
                                memory_mb=settings.memory_mb, compat=settings.compat).to(device).eval()
            converted_point = point
        else:
            program_chip(converted, settings.seed, chip)
        if point.adc_mode == "calibrated":
            calibrate_adc(converted, (x.to(device) for x in calib_inputs))
        data = chip_order(test_loader, settings.seed, chip) if settings.test_order == "per_chip" else test_loader
        metrics = evaluate(converted, data, device, desc=f"chip {chip}")
        record("sliced", metrics, time.perf_counter() - started, config=point.to_dict(),
               config_key=point.key(), chip=chip, mapped_layers=mapped_layer_names(converted))
        if chip == 0:
            first_chips[point.key()] = written[-1]
        log(f"{point.describe()}  chip {chip}: {describe_metrics(metrics)}  "
            f"({time.perf_counter() - started:.1f}s)")
    return written


# -- main.py's job -----------------------------------------------------------------------------------


@dataclass
class MainSettings(UserWorkloadOptions):
    """What main.py is asked (its options, by the same names; nipa.workloads.workload.Workload.from_args reads the
    model and data ones)."""

    model_name: str = "smallcnn"
    dataset: str = "mnist5k"
    HWdes: str = "HW_config/Search_space.ini"
    sample_num: int = 200  # 0: the full grid
    cycle: int = 3
    adc_mode: str | None = None  # overrides the INI's ADC mode when set
    per_read: bool = False
    compat: str | None = None  # --compat names (nipa.hardware.compat.Compat.parse)
    simulate_identical_chips: bool = False
    test_order: str = "fixed"  # nipa.simulator.evaluate.TEST_ORDERS
    calib_batches: int = 4
    memory_mb: float | None = None  # default: sized for the device (nipa.runtime.default_memory_mb)
    layer_override: Sequence[str] = ()  # LAYER:FIELD=VALUE,... (nipa.hardware.config.parse_layer_overrides)
    shard: tuple[int, int] | None = None
    log_file: str | None = None
    out: str | None = None  # default results/{model}/{dataset}_accsim.jsonl
    exclude_layer: Sequence[str] = ()
    include_layer: Sequence[str] | None = None
    block: str | None = None
    batch_size: int | None = None  # default: nipa.workloads.zoo.default_batch_size
    limit: int | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    gpu_id: int | None = None
    data_root: str = "data"
    ckpt_dir: str = "ckpts"
    ckpt: str | None = None


@dataclass
class SweepJobResult:
    """What a main.py run wrote: the records file (of its shard) and the records new in this run."""

    records_path: Path
    new_records: list[dict]


def _sweep_settings(job: MainSettings, exclude, include, weights: str | None,
                    extra: dict | None = None, device: str = "cpu") -> SweepSettings:
    return SweepSettings(
        model_name=job.model_name, dataset=job.dataset, hw_file=job.HWdes, sample_num=job.sample_num,
        cycle=job.cycle, seed=job.seed, batch_size=job.batch_size, limit=job.limit,
        exclude=exclude, include=include, adc_mode=job.adc_mode,
        per_read=job.per_read, calib_batches=job.calib_batches, memory_mb=job.memory_mb,
        shard=job.shard, copy_identical_chips=not job.simulate_identical_chips, weights=weights,
        compat=Compat.parse(job.compat), device=device, extra=extra or {}, test_order=job.test_order,
        layer_overrides=parse_layer_overrides(job.layer_override) or None)


def run_sweep_job(job: MainSettings, log: Callable[[str], None] | None = None) -> SweepJobResult:
    """main.py after argument parsing: checks, loads the model and data, and sweeps (run_sweep). `log`
    receives the progress lines; None: printed and appended to `job.log_file` (opened after the checks)."""
    from nipa.hardware.mapping import digital_report, select_layers
    from nipa.llm.load import is_llm_name, mapping_report
    from nipa.logs import open_log
    from nipa.runtime import default_memory_mb, resolve_device, seed_everything
    from nipa.workloads.workload import Workload, check_workload
    from nipa.workloads.zoo import default_batch_size, layer_selection, weights_file, weights_sha256

    # Every check the inputs allow comes before the model loads: the INI, the options, the device, the
    # results file (and, for a CNN, whether the file's sweep is this one).
    job = dataclasses.replace(job, batch_size=job.batch_size or default_batch_size(job.model_name))
    Compat.parse(job.compat)  # an unknown name is reported before any work
    space = SearchSpace.from_ini(job.HWdes)  # every bad value is reported before any work starts
    modes = [job.adc_mode] if job.adc_mode else space.choices.get("adc_mode", [])
    calibrated = "calibrated" in modes
    if calibrated and job.calib_batches < 1:
        raise UserError(f"--calib_batches {job.calib_batches}: the calibrated ADC mode "
                        f"({'--adc_mode' if job.adc_mode else job.HWdes}) needs at least one batch to set "
                        "its ranges")
    device = resolve_device(job.device, job.gpu_id)
    if job.memory_mb is None:
        job = dataclasses.replace(job, memory_mb=default_memory_mb(device))
    workload = Workload.from_args(job)  # the model and data, resolved once (nothing is loaded yet)
    if job.test_order != "fixed" and workload.kind == "llm":
        raise UserError(f"--test_order {job.test_order}: a language model's task has its own fixed batches of "
                        "text; only an image test set is reordered per chip")
    out = Path(job.out) if job.out else workload.results_path("accsim")
    check_results_path(shard_path(out, job.shard))
    existing = read_records(out)  # every shard: a damaged one is reported now, not after the model loads
    description = workload.describe()
    check_workload(existing, description, out)
    weights = workload.weights_sha256()
    if weights is not None:  # a CNN's layer selection is as given
        include = None if job.include_layer is None else list(job.include_layer)
        check_compatible(existing, _sweep_settings(job, list(job.exclude_layer), include, weights,
                                                   device=str(device)), out)
    log = log or open_log(job.log_file)
    size = len(space)
    log(f"{job.HWdes}: a grid of {size} distinct points; "
        + (f"sampling {job.sample_num}" if 0 < job.sample_num < size else "running all of them"))
    seed_everything(job.seed)
    model, meta, test_loader = workload.load(device=device, batch_size=job.batch_size,
                                             num_workers=job.num_workers, limit=job.limit)
    if weights is None:
        weights = weights_sha256(weights_file(job.model_name, job.dataset, job.ckpt_dir, job.ckpt, meta))
    include, exclude = layer_selection(job.model_name, model, job.include_layer, job.exclude_layer, job.block)
    mapped = select_layers(model, exclude=exclude, include=include)
    if job.layer_override:  # a layer pattern that matches no mapped layer fails before any simulation
        check_layer_patterns(list(parse_layer_overrides(job.layer_override)), mapped)
    log(mapping_report(model, mapped))
    if not is_llm_name(job.model_name):
        log(digital_report(model, mapped))
    settings = _sweep_settings(job, exclude, include, weights, {"checkpoint_top1": meta.get("test_top1"),
                                                                **({"workload": description} if description else {})},
                               device=str(device))
    check_compatible(existing, settings, out)  # before the calibration data are read
    calib_inputs = workload.calibration_inputs(test_loader, job.calib_batches if calibrated else 0,
                                               batch_size=job.batch_size, seed=job.seed)
    writer = RecordWriter(shard_path(out, job.shard))
    written = run_sweep(settings, model, test_loader, calib_inputs, device, out, writer, log)
    log(f"records in {writer.path}")
    return SweepJobResult(writer.path, written)


# -- chips until a standard error ---------------------------------------------------------------------


def simulate_to_target(base: SweepSettings, model: nn.Module, test_data, calib_inputs, device: torch.device,
                       records_path: Path, min_chips: int, max_chips: int, target_se: float,
                       log: Callable[[str], None] = print):
    """Simulate `base.points` (run_sweep with `base`'s settings) until each has `min_chips` chips and a
    standard error of its mean top-1 below `target_se` (at most `max_chips`), in rounds sized by the spread
    seen so far. Resumable: chips already in `records_path` are kept. Returns the grouped records
    (nipa.results.correlation.GroupedRecords) of these points."""
    from nipa.results.correlation import chips_wanted, group_records

    writer = RecordWriter(records_path)
    by_key = {p.key(): p for p in base.points or ()}
    wanted = dict.fromkeys(by_key, min_chips)
    for _ in range(max_chips + 1):
        grouped = group_records(read_records(records_path)) if records_path.is_file() else None
        have = {p.key: list(p.top1) for p in grouped.points} if grouped else {}
        for key, point in by_key.items():
            wanted[key] = max(wanted[key], chips_wanted(have.get(key, []), not identical_chips(point, base.test_order),
                                                        min_chips, max_chips, target_se))
        todo = {key: n for key, n in wanted.items() if len(have.get(key, [])) < n}
        if not todo:
            break
        for chips in sorted(set(todo.values())):
            subset = [by_key[k] for k, n in todo.items() if n == chips]
            log(f"ground truth: {len(subset)} point(s) up to {chips} chips")
            run_sweep(dataclasses.replace(base, cycle=chips, points=subset), model, test_data, calib_inputs, device,
                      records_path, writer, log)
    grouped = group_records(read_records(records_path))
    grouped.points = [p for p in grouped.points if p.key in by_key]
    return grouped
