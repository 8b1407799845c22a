"""Statistics of agreement between a metric and the ground truth, and the ground truth per hardware point.

Used by validate.py (log2 NIPA against simulated accuracy) and by any script that compares a fast
prediction with the slicing simulation.

- `agreement(x, y)`: Kendall's tau-b, Spearman's rho and Pearson's r with their two-sided p-values
  (scipy.stats) and seeded bootstrap percentile confidence intervals. The bootstrap resamples *points*
  with replacement (the hardware points are the units whose ranking is judged); the resampled
  coefficients are computed in a few vectorized numpy passes, identical to what scipy gives on each
  resample. Fewer than 3 points, or a constant variable, give NaN with the n reported, never an
  exception: a subgroup of a sweep can be that small.
- per-point diagnostics of the ground truth (`chip_agreement`, `noise_ceiling`, `chip_count_curve`,
  `one_factor_pairs`) on the points nipa.results.ground_truth reads (`group_records`, re-exported here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from nipa.hardware.config import HWConfig

# The ground truth per point is read by nipa.results.ground_truth; its names stay importable from here.
from nipa.results.ground_truth import (  # noqa: F401
    LOWER_IS_BETTER,
    MEASURES,
    GroupedRecords,
    PointResult,
    RecordsError,
    chip_mean,
    chip_std,
    group_records,
    measure_sign,
)

COEFFICIENTS = ("kendall", "spearman", "pearson")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of chip accuracies (sample std / sqrt n): inf below 2 chips (the
    spread is unknown), 0 when the chips agree."""
    if len(values) < 2:
        return math.inf
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


# The stopping rule judges the spread by an upper confidence bound on the chips' standard deviation, not by
# the sample value: three or four chips of a long-tailed point (a few bad chips among good ones) often agree
# by chance, and a rule that trusts their spread stops there with a biased mean (docs/estimate_analysis.md,
# section 14: the estimate's first 4 draws at W3 I4 S64 ADC6 spread 0.41 where 160 spread 2.4).
SPREAD_CONFIDENCE = 0.9


def spread_bound(values: Sequence[float], confidence: float = SPREAD_CONFIDENCE) -> float:
    """One-sided upper confidence bound on the standard deviation of the chips' distribution (normal theory:
    s sqrt((n - 1) / chi2_{1 - confidence, n - 1})); inf below 2 values."""
    n = len(values)
    if n < 2:
        return math.inf
    return float(np.std(values, ddof=1)) * math.sqrt((n - 1) / sps.chi2.ppf(1.0 - confidence, n - 1))


def chips_wanted(values: Sequence[float], chips_differ: bool, min_chips: int, max_chips: int,
                 target_se: float, confidence: float = SPREAD_CONFIDENCE) -> int:
    """How many chips a point needs: at least `min_chips`; while the standard error at the spread's upper
    confidence bound (`spread_bound`) exceeds `target_se`, the count that would reach it at that spread,
    (bound / target)^2, at least one more and at most `max_chips`. A point whose chips cannot differ (no
    device error, and a fixed test order or a batch-independent ADC: nipa.pipelines.sweep.identical_chips)
    needs `min_chips`."""
    have = len(values)
    if have < min_chips or not chips_differ:
        return min_chips
    if have >= max_chips:
        return have
    if have < 2:  # one chip says nothing about the spread: a second one does
        return have + 1
    spread = spread_bound(values, confidence)
    if spread / math.sqrt(have) <= target_se:
        return have
    return int(min(max_chips, max(have + 1, math.ceil((spread / target_se) ** 2))))


def sign_note(measure: str) -> str | None:
    """The sentence that says how a lower-is-better measure's correlations are signed (None for accuracy)."""
    if measure_sign(measure) > 0:
        return None
    return (f"lower {measure} is better: correlations are computed against -{measure}, so agreement is positive "
            f"(+1: the metric ranks the points exactly as the simulated {measure} does)")


MIN_POINTS = 3  # below this no coefficient (and no p-value) is meaningful: NaN is reported
# Work arrays of the vectorized Kendall bootstrap hold about this many pair entries at once (x 8 bytes):
# the memory stays bounded whatever the number of points.
_PAIR_BUDGET = 1 << 22


# ----------------------------------------------------------------------------------------------------
# Coefficients and bootstrap
# ----------------------------------------------------------------------------------------------------


@dataclass
class Coefficient:
    """One correlation coefficient: the estimate, its p-value and its bootstrap confidence interval."""

    value: float
    p_value: float
    ci_low: float = math.nan
    ci_high: float = math.nan

    def to_dict(self) -> dict[str, float | None]:
        return {k: _json_float(v) for k, v in (("value", self.value), ("p_value", self.p_value),
                                                ("ci_low", self.ci_low), ("ci_high", self.ci_high))}


@dataclass
class Agreement:
    """Kendall, Spearman and Pearson between x and y on n points, with the bootstrap settings used."""

    n: int
    kendall: Coefficient
    spearman: Coefficient
    pearson: Coefficient
    bootstrap: int = 0
    seed: int | None = None
    confidence: float = 0.95
    degenerate_resamples: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, **{name: getattr(self, name).to_dict() for name in COEFFICIENTS},
                "bootstrap": self.bootstrap, "seed": self.seed, "confidence": self.confidence,
                "degenerate_resamples": dict(self.degenerate_resamples)}


def _json_float(value: float) -> float | None:
    """NaN is not JSON: written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _clean(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        # A non-finite metric value is a bug upstream; dropping it silently would drop a point.
        bad = int((~np.isfinite(x) | ~np.isfinite(y)).sum())
        raise ValueError(f"{bad} non-finite value(s) among the {x.size} points")
    return x, y


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    return x.size < MIN_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0


def point_estimates(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, Coefficient]:
    """Kendall's tau-b, Spearman's rho, Pearson's r and their two-sided p-values (scipy.stats).

    NaN (value and p-value) where n < 3 or either variable is constant.
    """
    x, y = _clean(x, y)
    if _degenerate(x, y):
        return {name: Coefficient(math.nan, math.nan) for name in COEFFICIENTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's small-sample notes; the n is reported with the result
        tau = sps.kendalltau(x, y, variant="b")
        rho = sps.spearmanr(x, y)
        r = sps.pearsonr(x, y)
    return {"kendall": Coefficient(float(tau.statistic), float(tau.pvalue)),
            "spearman": Coefficient(float(rho.statistic), float(rho.pvalue)),
            "pearson": Coefficient(float(r.statistic), float(r.pvalue))}


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of every row pair of a, b [B, n]; NaN for a constant row."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / denom
    return np.where(denom > 0, np.clip(r, -1.0, 1.0), np.nan)


def _rowwise_kendall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every row pair of a, b [B, n]; NaN for a constant row.

    tau-b = sum_{i<j} sgn(dx) sgn(dy) / sqrt(#pairs untied in x * #pairs untied in y). Duplicated points
    of a resample are pairs tied in both, as scipy counts them.
    """
    batch, n = a.shape
    first_of_pair, second_of_pair = np.triu_indices(n, 1)
    out = np.empty(batch)
    step = max(1, _PAIR_BUDGET // max(1, first_of_pair.size))
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        sa = np.sign(a[rows, first_of_pair] - a[rows, second_of_pair])
        sb = np.sign(b[rows, first_of_pair] - b[rows, second_of_pair])
        concordance = (sa * sb).sum(axis=1)
        denom = np.sqrt(np.abs(sa).sum(axis=1) * np.abs(sb).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where(denom > 0, concordance / denom, np.nan)
    return out


def bootstrap_coefficients(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                           n_resamples: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """The three coefficients on `n_resamples` resamples of the points (with replacement), [n_resamples]
    each; NaN where a resample is constant in x or y. Seeded: the same seed gives the same numbers."""
    x, y = _clean(x, y)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, x.size, size=(n_resamples, x.size))
    xs, ys = x[index], y[index]
    ranks_x = sps.rankdata(xs, axis=1)  # average ranks for ties, as spearmanr uses
    ranks_y = sps.rankdata(ys, axis=1)
    return {"kendall": _rowwise_kendall(xs, ys), "spearman": _rowwise_pearson(ranks_x, ranks_y),
            "pearson": _rowwise_pearson(xs, ys)}


def agreement(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, bootstrap: int = 2000,
              seed: int = 0, confidence: float = 0.95) -> Agreement:
    """Kendall tau-b, Spearman, Pearson of (x, y) with p-values and percentile bootstrap CIs.

    bootstrap: resamples of the points (0 = no confidence intervals). Resamples in which x or y is
    constant have no coefficient; they are left out of the percentiles and counted in
    ``degenerate_resamples``. n < 3 gives NaN everywhere (with n reported), not an error.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, not {bootstrap}")
    x, y = _clean(x, y)
    coefficients = point_estimates(x, y)
    degenerate: dict[str, int] = {}
    if bootstrap and not _degenerate(x, y):
        samples = bootstrap_coefficients(x, y, bootstrap, seed)
        tail = 100.0 * (1.0 - confidence) / 2.0
        for name, values in samples.items():
            finite = values[np.isfinite(values)]
            degenerate[name] = int(values.size - finite.size)
            if finite.size:
                low, high = np.percentile(finite, [tail, 100.0 - tail])
                coefficients[name].ci_low, coefficients[name].ci_high = float(low), float(high)
    return Agreement(n=int(x.size), bootstrap=int(bootstrap), seed=seed, confidence=confidence,
                     degenerate_resamples=degenerate, **coefficients)


# ----------------------------------------------------------------------------------------------------
# Ground truth per hardware point (read by nipa.results.ground_truth)
# ----------------------------------------------------------------------------------------------------


def split_by(points: Sequence[PointResult], attribute: str) -> dict[Any, list[int]]:
    """Indices of the points per value of one hardware parameter (sorted by value)."""
    groups: dict[Any, list[int]] = {}
    for i, point in enumerate(points):
        groups.setdefault(getattr(point.config, attribute), []).append(i)
    return dict(sorted(groups.items(), key=lambda item: (str(type(item[0])), item[0])))


def one_factor_pairs(configs: Sequence[HWConfig], x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                     fields: Sequence[str]) -> dict[str, dict[str, int]]:
    """Among the pairs of points that differ in exactly one hardware parameter, per parameter: how many
    pairs, and how many are concordant, discordant, tied in x (the metric ignores that parameter there)
    or tied in y (the ground truth cannot tell them apart). A diagnosis of which term of a metric orders
    the points wrongly; pairs differing in several parameters are not counted here."""
    x, y = _clean(x, y)
    dicts = [c.canonical().to_dict() for c in configs]
    counts = {name: {"pairs": 0, "concordant": 0, "discordant": 0, "tied_x": 0, "tied_y": 0} for name in fields}
    for i in range(len(dicts)):
        for j in range(i + 1, len(dicts)):
            differ = [k for k in dicts[i] if dicts[i][k] != dicts[j][k]]
            if len(differ) != 1 or differ[0] not in counts:
                continue
            count = counts[differ[0]]
            count["pairs"] += 1
            product = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
            if x[i] == x[j]:
                count["tied_x"] += 1
            elif y[i] == y[j]:
                count["tied_y"] += 1
            elif product > 0:
                count["concordant"] += 1
            else:
                count["discordant"] += 1
    return counts


def chip_agreement(points: Sequence[PointResult], measure: str = "top1") -> dict[str, Any]:
    """How well the ground truth agrees with itself: Kendall's tau-b between the accuracies of two chips
    (chip a vs chip b over the points that have both), averaged over the chip pairs.

    A metric cannot be expected to rank points much better than one simulated chip ranks them as another
    does; the mean over chips is less noisy than one chip, so this is a rough, pessimistic ceiling.
    """
    chip_ids = sorted({c for p in points for c in p.chips})
    taus, sizes = [], []
    for i, a in enumerate(chip_ids):
        for b in chip_ids[i + 1:]:
            # tau between two chips is the same whichever sign the measure has
            pairs = []
            for p in points:
                if a in p.chips and b in p.chips:
                    values = getattr(p, measure)
                    pair = (values[p.chips.index(a)], values[p.chips.index(b)])
                    if None not in pair:
                        pairs.append(pair)
            if len(pairs) < MIN_POINTS:
                continue
            tau = point_estimates(*zip(*pairs, strict=True))["kendall"].value
            if math.isfinite(tau):
                taus.append(tau)
                sizes.append(len(pairs))
    return {"kendall_between_chips": _json_float(float(np.mean(taus))) if taus else None,
            "chip_pairs": len(taus), "points_per_pair": sizes}


def noise_ceiling(points: Sequence[PointResult], n_draws: int = 500, seed: int = 0,
                  measure: str = "top1") -> dict[str, Any]:
    """A rough ceiling on Kendall's tau that any metric can reach on these records, given their
    chip-to-chip noise: the mean tau-b between the chip-mean accuracies m and m + e, with e drawn as
    N(0, s_i^2 / chips_i) per point (s_i its chip std; points with one chip take the median s of the
    others). It treats the observed means as the truth, so it somewhat overstates the ceiling; it
    ignores the test set's own sampling noise (which all points share); and it takes the noise as
    independent between points, whereas chips drawn with common random numbers (chip c of every point
    from the same draws) shift whole groups of points together. NaN when no point has 2 chips.
    """
    means = np.array([p.mean(measure) for p in points])  # tau(m, m + e) does not depend on the sign
    spreads = np.array([chip_std(p.values(measure)) for p in points])
    known = np.isfinite(spreads)
    if len(points) < MIN_POINTS or not known.any():
        return {"kendall": None, "draws": 0, "median_chip_std": None}
    fill = float(np.median(spreads[known]))
    sd = np.where(known, spreads, fill) / np.sqrt([p.num_chips for p in points])
    rng = np.random.default_rng(seed)
    noisy = means[None, :] + rng.normal(size=(n_draws, means.size)) * sd[None, :]
    taus = _rowwise_kendall(np.broadcast_to(means, noisy.shape), noisy)
    taus = taus[np.isfinite(taus)]
    return {"kendall": _json_float(float(taus.mean())) if taus.size else None,
            "kendall_p05": _json_float(float(np.percentile(taus, 5))) if taus.size else None,
            "draws": int(n_draws), "seed": seed, "median_chip_std": fill}


CHIP_LADDER = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 60, 80, 100)


def chip_count_curve(x: Sequence[float] | np.ndarray, chip_values: Sequence[Sequence[float]],
                     draws: int = 200, seed: int = 0) -> dict[str, Any] | None:
    """How Kendall's tau-b of the metric `x` against the chip-mean accuracy grows with the chips per point:
    is the ground truth converged, or would more chips change the verdict?

    For m chips, each point with more than m chips is represented by the mean of m of its chips drawn
    without replacement (a point with at most m keeps all of its chips), `draws` times; the curve is the
    mean (and spread) of tau per m, each an unbiased estimate of the tau an m-chip sweep would give.
    It ends at the fewest chips of any point whose chips differ (beyond, some points could not be drawn
    with m chips); points whose chips all agree (no device error) are the same for every m.
    `gain_last_doubling` is tau at the end minus tau at half as many chips (or the nearest fewer): near
    zero when more chips would no longer help. No extrapolation is offered: fitted to m <= 20 on
    synthetic data with a known answer, neither a 1/sqrt(m) nor a 1/m law found the unlimited-chips tau
    to better than about 0.08. None when no point has two different chip results.
    """
    x = np.asarray(x, dtype=float)
    chips = [np.asarray(v, dtype=float) for v in chip_values]
    if len(chips) != x.size:
        raise ValueError(f"{x.size} metric values but {len(chips)} points of chips")
    varying = [c.size for c in chips if c.size > 1 and np.ptp(c) > 0]
    if not varying or x.size < MIN_POINTS:
        return None
    most = min(varying)
    ladder = sorted({m for m in CHIP_LADDER if m < most} | {most})
    rng = np.random.default_rng(seed)
    curve, spread = [], []
    for m in ladder:
        y = np.empty((draws, len(chips)))
        for j, values in enumerate(chips):
            if values.size <= m:
                y[:, j] = chip_mean(values)
            else:
                chosen = rng.random((draws, values.size)).argsort(axis=1)[:, :m]
                y[:, j] = np.round(values[chosen].mean(axis=1), 9)  # as chip_mean: equal means tie
        taus = _rowwise_kendall(np.broadcast_to(x, y.shape), y)
        taus = taus[np.isfinite(taus)]
        curve.append(float(taus.mean()) if taus.size else math.nan)
        spread.append(float(taus.std()) if taus.size else math.nan)
    half = max(m for m in ladder if m <= max(1, most // 2))
    gain = curve[-1] - curve[ladder.index(half)] if half < most else math.nan
    return {"chips": ladder, "kendall": [_json_float(v) for v in curve],
            "kendall_std": [_json_float(v) for v in spread], "draws": draws, "seed": seed,
            "gain_last_doubling": _json_float(gain), "doubling_from": half}
