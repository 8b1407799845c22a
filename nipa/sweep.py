"""The ground-truth sweep of main.py: every hardware point, `cycle` chips each, one record per chip."""

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

from nipa.compat import NO_COMPAT, Compat
from nipa.config import HWConfig, PerLayerConfig, SearchSpace, layered
from nipa.crossbar import calibrate_adc, compile_mode, convert, mapped_layer_names, program_chip
from nipa.errors import UserError
from nipa.evaluate import describe_metrics, evaluate, resident_batches
from nipa.records import SWEEP_KEY, RecordWriter, done_keys, environment, read_records, timestamp
from nipa.runtime import device_signature
from nipa.zoo import dataset_id, model_id

# The simulator's numeric semantics: 1 = an ADC range per tile in `dynamic` mode (before 2026-12),
# 2 = one range per layer, input bit and slice over every tile (SPEC section 4, step 6).
SIMULATOR_VERSION = 2


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
    # sha256 of the weights (nipa.zoo.weights_sha256): records of other weights never join a sweep.
    weights: str | None = None
    # The original tool's choices the simulator reproduces (--compat; nipa.compat).
    compat: Compat = NO_COMPAT
    # Per-layer overrides ({layer pattern: {field: value}}, nipa.config.layered) applied to every sampled point.
    layer_overrides: dict[str, dict[str, int]] | None = None
    # The device the chips are simulated on ("cpu", "cuda:0"): its type and GPU model are settings, since
    # per-read draws and float rounding differ between devices (run_sweep sets it to its own device).
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

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
                 "memory_mb": settings.memory_mb, **environment()}
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
            and not point.has_device_error else None
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
        metrics = evaluate(converted, test_loader, device, desc=f"chip {chip}")
        record("sliced", metrics, time.perf_counter() - started, config=point.to_dict(),
               config_key=point.key(), chip=chip, mapped_layers=mapped_layer_names(converted))
        if chip == 0:
            first_chips[point.key()] = written[-1]
        log(f"{point.describe()}  chip {chip}: {describe_metrics(metrics)}  "
            f"({time.perf_counter() - started:.1f}s)")
    return written
