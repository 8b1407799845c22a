"""The Python API, for notebooks and other tools: a model object and data in, plain results out.

    import nipa
    results = nipa.simulate(model, (x_test, y_test), {"wl_weight": 6, "vari": 0.2}, chips=3)
    stats = nipa.statistics(model, [(6, 64, 1)])
    nipa.score(stats, {"wl_weight": 6, "vari": 0.2})           # NIPA of the point
    nipa.estimate(model, (x_test, y_test), {"wl_weight": 6, "vari": 0.2}, draws=3,
                  calibration=x_train[:256])                      # the fast error-injection prediction

`model`: any classifier (nn.Module) whose nn.Linear / nn.Conv2d (groups=1) layers are mapped; `data`: a
DataLoader of (inputs, labels) or an (inputs, labels) tensor pair; `hw`: an HWConfig, a dict of its
fields (the others take their defaults) or a list of them. One point in, one result out; a list in, a
list out. ADC calibration (the `calibrated` ADC mode, the measured ADC error of `estimate`) takes
`calibration` inputs, which should come from the training data, never the test data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nipa.errors import UserError
from nipa.estimation.inject import DEFAULT_METHOD
from nipa.estimation.stats import ModelStats
from nipa.hardware.config import HWConfig

Hardware = HWConfig | Mapping[str, Any]


@dataclass
class _PointAccuracies:
    """Top-1 accuracy (%) of one point per chip or draw, the float model's, and the wall time."""

    point: HWConfig
    accuracy: list[float]
    ideal: float
    seconds: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracy))


class SimulationResult(_PointAccuracies):
    """The bit-and-crossbar simulation of one point: top-1 accuracy (%) of each chip, and the float model's."""


@dataclass
class EstimateResult(_PointAccuracies):
    """The fast prediction of one point: top-1 accuracy (%) of each injection draw; their mean predicts.
    relative_adc_error: per mapped layer, the ADC error the estimate injects over the layer's signal (rms;
    nipa.estimation.reliability), None for the published method; `trusted` says whether it is within
    TRUST_RATIO in every layer (where it is not, simulate the point to know). With untrusted="simulate",
    such a point's `accuracy` holds simulated chips instead (`source` "simulated"; other chips than seed's)
    and `estimate` the draws it replaces."""

    relative_adc_error: dict[str, float] | None = None
    source: str = "estimate"  # or "simulated"
    estimate: list[float] | None = None  # the draws a simulated point's chips replace

    @property
    def trusted(self) -> bool | None:
        from nipa.estimation.reliability import trusted

        return trusted(self.relative_adc_error)


def as_points(hw: Hardware | Sequence[Hardware]) -> tuple[list[HWConfig], bool]:
    """(points, single): HWConfig / dict / a list of them as HWConfigs."""
    single = isinstance(hw, (HWConfig, Mapping))
    items = [hw] if single else list(hw)
    points = [p if isinstance(p, HWConfig) else HWConfig.from_dict(dict(p)) for p in items]
    if not points:
        raise UserError("no hardware point given")
    return points, single


def as_loader(data: Any, batch_size: int = 256) -> Any:
    """A DataLoader (or anything iterable over (inputs, labels)) as it is; an (x, y) pair as a loader."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, labels = data
        dataset = torch.utils.data.TensorDataset(inputs.float(), labels.long())
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return data


def _batches(calibration: torch.Tensor | Iterable | None, batch_size: int) -> list[torch.Tensor]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        return list(calibration.float().split(batch_size))
    return [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]


def simulate(model: nn.Module, data: Any, hw: Hardware | Sequence[Hardware], chips: int = 3, *, seed: int = 0,
             exclude: Sequence[str] = (), include: Sequence[str] | None = None,
             calibration: torch.Tensor | Iterable | None = None, device: str | torch.device = "cpu",
             memory_mb: float = 256, batch_size: int = 256) -> SimulationResult | list[SimulationResult]:
    """Top-1 accuracy of `chips` simulated chips per point (the ground truth main.py records)."""
    from nipa.simulator.crossbar import calibrate_adc, convert, program_chip
    from nipa.simulator.evaluate import evaluate

    points, single = as_points(hw)
    loader = as_loader(data, batch_size)
    calib = _batches(calibration, batch_size)
    if any(p.adc_mode == "calibrated" for p in points) and not calib:
        raise UserError("the calibrated ADC mode needs calibration inputs (training data): calibration=x_train[:256]")
    ideal = evaluate(model, loader, device)["top1"]
    results = []
    for point in points:
        started = time.perf_counter()
        converted, accuracy = None, []
        for chip in range(chips):
            if converted is None:
                converted = convert(model, point, exclude=exclude, include=include, seed=seed, chip=chip,
                                    memory_mb=memory_mb).to(device).eval()
            else:
                program_chip(converted, seed, chip)
            if point.adc_mode == "calibrated":
                calibrate_adc(converted, (x.to(device) for x in calib))
            accuracy.append(evaluate(converted, loader, device)["top1"])
        results.append(SimulationResult(point, accuracy, ideal, time.perf_counter() - started))
    return results[0] if single else results


def _combo(item: Any) -> tuple[int, int, int]:
    if isinstance(item, (HWConfig, Mapping)):
        point = item if isinstance(item, HWConfig) else HWConfig.from_dict(dict(item))
        return point.wl_weight, point.subArray, point.cellBit
    w, s, c = item
    return int(w), int(s), int(c)


def statistics(model: nn.Module, combos: Iterable[Any], *, exclude: Sequence[str] = (),
               include: Sequence[str] | None = None) -> ModelStats:
    """Bit statistics (stat.py) for (wl_weight, subArray, cellBit) triples, or for the combinations of
    hardware points (HWConfig / dict)."""
    from nipa.estimation.stats import model_statistics

    return model_statistics(model, [_combo(c) for c in combos], exclude, include, model_name="api")


def score(stats: ModelStats, hw: Hardware | Sequence[Hardware], **options: str) -> float | list[float]:
    """NIPA of each point from the statistics (higher = more robust); options as nipa.estimation.metric.nipa_metric's
    (reduction, tile_factor, device_model, adc_term)."""
    from nipa.estimation.metric import nipa_metric

    points, single = as_points(hw)
    missing = sorted({"w{}_s{}_c{}".format(*_combo(p)) for p in points} - set(stats.combos))
    if missing:
        raise UserError(f"no statistics for {', '.join(missing)}: compute them with nipa.statistics(model, points)")
    values = np.atleast_1d(nipa_metric(stats, points, **options))
    return float(values[0]) if single else [float(v) for v in values]


def estimate(model: nn.Module, data: Any, hw: Hardware | Sequence[Hardware], draws: int = 3, *,
             method: str = DEFAULT_METHOD, stats: ModelStats | None = None,
             calibration: torch.Tensor | Iterable | None = None, seed: int = 0, exclude: Sequence[str] = (),
             include: Sequence[str] | None = None, device: str | torch.device = "cpu", memory_mb: float = 256,
             batch_size: int = 256, untrusted: str = "estimate") -> EstimateResult | list[EstimateResult]:
    """The fast prediction of each point (wrap_error.py): `draws` error-injection draws. method
    "repeated" (default), "calibrated", "planes", "conditional" measure the ADC error on `calibration`
    inputs (training data); "published" uses the formula terms of `stats` (computed here when not given).
    untrusted="simulate": a point the trust check does not trust is simulated on `draws` chips instead
    (adaptive fidelity; seed + nipa.pipelines.wrap.FALLBACK_SEED_OFFSET, as wrap_error.py --untrusted)."""
    from nipa.estimation.inject import AdcCalibration, InjectionModel, calibration_upstream
    from nipa.pipelines.wrap import FALLBACK_SEED_OFFSET, UNTRUSTED, FastMethod, WrapSettings
    from nipa.simulator.evaluate import evaluate

    points, single = as_points(hw)
    loader = as_loader(data, batch_size)
    errors = InjectionModel.of(method)
    if untrusted not in UNTRUSTED:
        raise UserError(f"untrusted={untrusted!r}: must be one of {', '.join(UNTRUSTED)}")
    if untrusted == "simulate" and errors.adc != "measured":
        raise UserError(f"untrusted='simulate': method {method!r} has no trust check (it needs a measured ADC error)")
    if stats is None and "formula" in (errors.device, errors.adc):
        stats = statistics(model, points, exclude=exclude, include=include)
    calib = _batches(calibration, batch_size)
    needs_calibration = errors.adc == "measured" or any(p.adc_mode == "calibrated" for p in points)
    if needs_calibration and not calib:
        raise UserError(f"method {method!r} measures the ADC error on calibration inputs (training data): "
                        "calibration=x_train[:256]")
    adc = AdcCalibration(model, calib, exclude=exclude, include=include, memory_mb=memory_mb, seed=seed,
                         upstream=calibration_upstream(errors)) if errors.adc == "measured" else None
    settings = WrapSettings(model_name="api", dataset="api", cycle=draws, seed=seed, errors=errors,
                            exclude=exclude, include=include, batch_size=batch_size)
    fast = FastMethod(model, settings, stats, adc, torch.device(device))
    ideal = evaluate(model, loader, device)["top1"]
    results = []
    for point in points:
        started = time.perf_counter()
        fast.calibrate(point)
        accuracy = [metrics["top1"] for _, metrics, _ in fast.draws(point, range(draws), loader)]
        check = fast.adc_check(point)
        ratios = None if check is None else check.ratios
        result = EstimateResult(point, accuracy, ideal, time.perf_counter() - started, ratios)
        if untrusted == "simulate" and result.trusted is False:
            chips = simulate(model, loader, point, chips=draws, seed=seed + FALLBACK_SEED_OFFSET, exclude=exclude,
                             include=include, calibration=calib, device=device, memory_mb=memory_mb)
            result = EstimateResult(point, chips.accuracy, ideal, time.perf_counter() - started, ratios,
                                    source="simulated", estimate=accuracy)
        results.append(result)
    return results[0] if single else results
