"""The one reader of ground-truth records: main.py's per-chip records grouped per hardware point.

validate.py, wrap_error.py and explore.py --verify read the simulator's records here, with one set of
rules: only the `method` ("sliced") and "ideal" records count; records of another model, dataset or run
settings in one file are an error that says what differs; a chip recorded twice with the same results
(shards run twice, files merged by hand) counts once; two different results for one chip are an error;
every point found is kept, whatever its chip count, in key order (so every number reported is the same
whatever the order of the records: one file or its shards, resumed runs).

- `group_records(records)`: the records -> `GroupedRecords` (one `PointResult` per point: its chips'
  top1, top5, loss, perplexity and wall-clock seconds; the float model's values; the run settings).
- `read_ground_truth(path)`: the same from a results file and its shards, with an error naming the
  main.py command when there is nothing to read.
- `GroundTruth.of(grouped)`: the per-point view wrap_error's comparison works on (the chips' values
  of the measure judged by).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nipa.errors import UserError
from nipa.hardware.config import HWConfig, config_from_dict
from nipa.results.records import read_records, sibling_files

# What a point's chips are judged by: accuracies in percent (higher is better), or the test loss (mean
# cross-entropy, nats) and an LLM text's perplexity (lower is better).
MEASURES = ("top1", "top5", "loss", "perplexity")
LOWER_IS_BETTER = ("loss", "perplexity")


def measure_sign(measure: str) -> int:
    """+1 for an accuracy, -1 for loss and perplexity: the factor that makes agreement with a metric whose
    larger values mean a better point (NIPA, a predicted accuracy) positive."""
    if measure not in MEASURES:
        raise ValueError(f"measure {measure!r} is not one of {MEASURES}")
    return -1 if measure in LOWER_IS_BETTER else 1




def chip_mean(values: Sequence[float]) -> float:
    """Mean of per-chip accuracies, rounded to 1e-9 so that equal means are equal floats: (97.9 + 97.2 +
    97.2) / 3 and (97.5 + 97.4 + 97.4) / 3 differ in the last bit otherwise, and Kendall's tau-b would
    count a tie as a concordant or discordant pair. NaN for no chips."""
    return round(float(np.mean(values)), 9) if len(values) else math.nan


def chip_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1) of per-chip accuracies; NaN for fewer than 2 chips.

    statistics.stdev is exact for equal values (numpy gives ~1e-14 for three equal floats).
    """
    return float(statistics.stdev(values)) if len(values) > 1 else math.nan


class RecordsError(UserError):
    """Records that cannot be combined into one validation (mixed runs, conflicting chips)."""


@dataclass
class PointResult:
    """The simulated accuracy of one hardware point over its chips."""

    key: str  # HWConfig.key(): the identity of the point
    config: HWConfig
    chips: tuple[int, ...]  # chip ids, ascending
    top1: tuple[float, ...]  # per chip, same order
    top5: tuple[float | None, ...]
    samples: int | None
    hw_file: str | None
    loss: tuple[float | None, ...] = ()  # per chip, same order (empty: not recorded)
    perplexity: tuple[float | None, ...] = ()
    wall_s: tuple[float, ...] = ()  # seconds each chip took to simulate (NaN where not recorded)

    def values(self, measure: str) -> list[float]:
        """The per-chip values of one measure (MEASURES) that were recorded."""
        if measure not in MEASURES:
            raise ValueError(f"measure {measure!r} is not one of {MEASURES}")
        return [float(v) for v in getattr(self, measure) if v is not None]

    def mean(self, measure: str) -> float:
        return chip_mean(self.values(measure))

    @property
    def num_chips(self) -> int:
        return len(self.chips)

    @property
    def top1_mean(self) -> float:
        return chip_mean(self.values("top1"))  # NaN for a perplexity task's chips (no accuracy)

    @property
    def top1_std(self) -> float:
        """Sample standard deviation over the chips (ddof = 1); NaN for a single chip."""
        return chip_std(self.values("top1"))

    @property
    def top5_mean(self) -> float:
        values = [v for v in self.top5 if v is not None]
        return chip_mean(values)


@dataclass
class GroupedRecords:
    """What a results file says: the hardware points (first-seen order), the float model, the run."""

    points: list[PointResult]
    ideal_top1: float | None
    ideal_top5: float | None
    run: dict[str, Any] | None
    model: str | None
    dataset: str | None
    hw_files: list[str]
    mapped_layers: list[str] | None
    duplicates: int = 0  # identical repeated chip records (e.g. merged overlapping shards), counted once
    ideal_loss: float | None = None
    ideal_perplexity: float | None = None

    def ideal(self, measure: str) -> float | None:
        """The float model's value of one measure (None when not recorded)."""
        return {"top1": self.ideal_top1, "top5": self.ideal_top5, "loss": self.ideal_loss,
                "perplexity": self.ideal_perplexity}[measure]

    def chip_counts(self) -> dict[int, int]:
        """{chips per point: number of points with that many}."""
        counts: dict[int, int] = {}
        for point in self.points:
            counts[point.num_chips] = counts.get(point.num_chips, 0) + 1
        return dict(sorted(counts.items()))

    def describe_chips(self) -> str:
        """E.g. '90 points: 87 with 3 chips, 3 with 2 chips'."""
        parts = [f"{count} with {chips} chip{'s' if chips != 1 else ''}"
                 for chips, count in sorted(self.chip_counts().items(), reverse=True)]
        return f"{len(self.points)} points: " + ", ".join(parts)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def group_records(records: Iterable[Mapping[str, Any]], method: str = "sliced",
                  measure: str = "top1") -> GroupedRecords:
    """Average the chips of every hardware point among the `method` records; keep the "ideal" record.

    Every point found is kept, whatever its chip count. Raises RecordsError when records disagree in
    their run settings ("run"), model or dataset, give two different results for one chip, or lack the
    `measure` (MEASURES; top5 may be missing) the caller will judge them by.
    """
    measure_sign(measure)  # an unknown measure fails here
    by_key: dict[str, dict[str, Any]] = {}
    ideal: Mapping[str, Any] | None = None
    reference: Mapping[str, Any] | None = None  # the first record: every other must match its run
    duplicates = 0
    hw_files: dict[str, None] = {}
    mapped: list[str] | None = None
    for number, record in enumerate(records):
        kind = record.get("method")
        if kind not in (method, "ideal"):
            continue
        if reference is None:
            reference = record
        else:
            for name in ("model", "dataset"):
                if record.get(name) != reference.get(name):
                    raise RecordsError(f"records of different {name}s in one results file: "
                                       f"{reference.get(name)!r} and {record.get(name)!r} (record {number})")
            if record.get("run") != reference.get("run"):
                diff = _differences(reference.get("run") or {}, record.get("run") or {})
                where = record.get("config_key") or "the ideal model"
                raise RecordsError(f"records disagree in their run settings, so their accuracies are not "
                                   f"comparable: record {number} ({where}) differs from the first in "
                                   f"(first, this) {diff}; give each run its own results file (--out)")
        if kind == "ideal":
            ideal = ideal or record  # shards: only one writes it; a repeat would be the same model
            continue
        if record.get("hw_file"):
            hw_files[str(record["hw_file"])] = None
        if mapped is None and record.get("mapped_layers") is not None:
            mapped = list(record["mapped_layers"])
        config = config_from_dict(record["config"])  # a per-layer point's config holds "layers"
        key = record.get("config_key") or config.key()
        entry = by_key.setdefault(key, {"config": config, "chips": {}, "wall_s": {}, "samples": record.get("samples"),
                                        "hw_file": record.get("hw_file")})
        if record.get("samples") != entry["samples"]:
            raise RecordsError(f"point {config.describe()}: chips evaluated on different sample counts "
                               f"({entry['samples']} and {record.get('samples')})")
        chip = int(record.get("chip") or 0)
        if measure in ("top1", "top5") and record.get("top1") is None:
            raise RecordsError(f"point {config.describe()}, chip {chip}: the record holds no accuracy (a "
                               f"perplexity task: perplexity {record.get('perplexity')}); judge it by its "
                               "perplexity with --measure perplexity (or loss), or run main.py on a "
                               "multiple-choice task")
        if measure in LOWER_IS_BETTER and record.get(measure) is None:
            held = [name for name in MEASURES if record.get(name) is not None]
            raise RecordsError(f"point {config.describe()}, chip {chip}: the record holds no {measure} (it holds "
                               f"{held}); choose a measure it holds with --measure")
        result = tuple(None if record.get(name) is None else float(record[name]) for name in MEASURES)
        if chip in entry["chips"]:
            if entry["chips"][chip] != result:
                raise RecordsError(f"point {config.describe()}, chip {chip}: two records with different "
                                   f"results {entry['chips'][chip]} and {result}")
            duplicates += 1
            continue
        entry["chips"][chip] = result
        entry["wall_s"][chip] = math.nan if record.get("wall_s") is None else float(record["wall_s"])
    points = []
    # Points in key order: every number reported (the bootstrap resamples by position) is then the same
    # whatever the order of the records (one file or its shards, resumed runs).
    for key, entry in sorted(by_key.items()):
        chips = sorted(entry["chips"])
        values = {name: tuple(entry["chips"][c][i] for c in chips) for i, name in enumerate(MEASURES)}
        points.append(PointResult(key=key, config=entry["config"], chips=tuple(chips), samples=entry["samples"],
                                  wall_s=tuple(entry["wall_s"][c] for c in chips),
                                  hw_file=entry["hw_file"], **values))
    ref = reference or {}

    def of_ideal(name: str) -> float | None:
        return None if ideal is None or ideal.get(name) is None else float(ideal[name])

    return GroupedRecords(
        points=points, ideal_top1=of_ideal("top1"), ideal_top5=of_ideal("top5"),
        run=ref.get("run"), model=ref.get("model"), dataset=ref.get("dataset"), hw_files=list(hw_files),
        mapped_layers=mapped, duplicates=duplicates, ideal_loss=of_ideal("loss"),
        ideal_perplexity=of_ideal("perplexity"))


class MissingGroundTruth(UserError):
    """No simulated records to read; the message names the main.py command that makes them."""


def read_ground_truth(path: str | Path, measure: str = "top1", command: str = "python main.py",
                      model: str | None = None, dataset: str | None = None) -> GroupedRecords:
    """The sliced records of a main.py results file (and its shards) grouped per point (group_records).

    `command` is the main.py command line that makes them, named when the file is missing, empty or holds
    no simulated point. `model` and `dataset` (ids, nipa.workloads.zoo.model_id / dataset_id): the records must be
    of them when given."""
    path = Path(path)
    if not sibling_files(path):
        raise MissingGroundTruth(f"{path} does not exist (nor shards of it): make the ground truth first "
                                 f"with\n    {command}")
    records = read_records(path)
    grouped = group_records(records, measure=measure)
    if not grouped.points:
        what = "holds no record" if not records else "holds no simulated hardware point (method 'sliced')"
        raise MissingGroundTruth(f"{path} {what}: make the ground truth first with\n    {command}")
    for name, wanted in (("model", model), ("dataset", dataset)):
        have = getattr(grouped, name)
        if wanted is not None and have not in (None, wanted):
            raise RecordsError(f"{path} holds records of {name} {have!r}, not {wanted!r}")
    return grouped


# ----------------------------------------------------------------------------------------------------
# The per-point view of wrap_error's comparison
# ----------------------------------------------------------------------------------------------------


@dataclass
class PointTruth:
    """The ground-truth records of one hardware point."""

    config: HWConfig
    key: str
    top1: list[float] = field(default_factory=list)  # one per simulated chip (the measure judged by)
    wall_s: list[float] = field(default_factory=list)
    # Every measure the chips recorded (top1, loss, perplexity), one value per chip; a measure that one
    # chip lacks is left out.
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.top1))


@dataclass
class GroundTruth:
    ideal_top1: float | None
    points: list[PointTruth]
    run: dict[str, Any]  # the sweep's settings (batch_size, limit, seed, exclude, include, ...)
    source: str
    measure: str = "top1"  # what PointTruth.top1 holds: top1, loss or perplexity
    ideal: dict[str, float | None] = field(default_factory=dict)  # the float model's value of each measure

    @classmethod
    def of(cls, grouped: GroupedRecords, measure: str = "top1", source: str = "") -> GroundTruth:
        """The view of grouped records: each point's `top1` holds its chips' `measure`, `values` every
        measure (top1, loss, perplexity) that all its chips recorded."""
        kept = ("top1", "loss", "perplexity")
        points = []
        for point in grouped.points:
            values = {name: point.values(name) for name in kept if point.values(name)}
            points.append(PointTruth(point.config, point.key, top1=point.values(measure),
                                     wall_s=list(point.wall_s) or [math.nan] * point.num_chips, values=values))
        return cls(ideal_top1=grouped.ideal_top1, points=points, run=dict(grouped.run or {}), source=source,
                   measure=measure, ideal={name: grouped.ideal(name) for name in kept})
