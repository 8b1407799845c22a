"""Design-space exploration (the library of explore.py): NIPA and hardware cost of every point of a space,
the Pareto fronts of NIPA against area, energy and latency, and a verification of the ranking against
the slicing ground truth.

1. `explore_grid`: the space's points. Simulation points (`HWConfig`) come from the INI's NIPA
   parameters; (wl_weight, cellBit) pairs that a cell cannot slice are skipped with a note
   (SearchSpace.from_ini(skip_unsliceable=True)). Every simulation point is crossed with the cost-only
   knobs (ADC_share, crossbar_columns), which change cost but not accuracy.
2. `rank_points`: one statistics pass (nipa.estimation.stats.model_statistics, stat.py's library function) for
   every (wl_weight, subArray, cellBit); NIPA through nipa.estimation.metric.nipa_metric, which is vectorized over
   points (called once for all distinct simulation points, then spread over the cost-knob rows); cost
   through nipa.hardware.cost.hardware_cost, vectorized over rows.
3. `pareto_front`: NIPA up, cost down, per cost; rows over a budget are off every front.
4. `verify`: N distinct simulation points (the fronts first, then a sample stratified over the space's
   log2 NIPA range; or a uniform sample of the space) simulated by the ground-truth sweep
   (nipa.pipelines.sweep, its records file, resumable), chips added to a point until the standard error
   of its mean is below a target; the fast estimate (nipa.pipelines.wrap's method) on the same points;
   Kendall tau of NIPA and of the estimate against the simulated accuracy, the estimate's mean absolute
   error and the regret of choosing by NIPA under cost budgets.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nipa import paths
from nipa.errors import UserError
from nipa.estimation.inject import DEFAULT_CALIB_BATCHES, DEFAULT_METHOD
from nipa.estimation.metric import nipa_metric
from nipa.estimation.stats import ModelStats
from nipa.hardware.config import COST_KNOBS, HWConfig, SearchSpace
from nipa.hardware.cost import CostCoefficients, LayerShape, hardware_cost, layer_shapes
from nipa.pipelines.sweep import identical_chips
from nipa.results.correlation import standard_error

COSTS = ("area_mm2", "energy_nj", "latency_us")
COST_LABELS = {"area_mm2": "area (mm$^2$)", "energy_nj": "energy per inference (nJ)",
               "latency_us": "latency per inference (us)"}
BUDGET_OPTIONS = {"area_mm2": "max_area", "energy_nj": "max_energy", "latency_us": "max_latency"}
VERIFY_SAMPLES = ("fronts", "random")  # explore.py --verify_sample
# Columns of the CSV that describe a row's hardware point, in this order.
POINT_COLUMNS = ("wl_weight", "wl_input", "subArray", "ADCprecision", "cellBit", "onoffratio", "vari_type",
                 "vari", "ind_vari", "laplace_b", "SAF_prop", "adc_mode", *COST_KNOBS)


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------


@dataclass
class ExploreGrid:
    """Distinct simulation points and the rows (simulation point x cost knobs) explored."""

    configs: list[HWConfig]
    config_index: np.ndarray  # [R] row -> index into configs
    knobs: dict[str, np.ndarray]  # cost-only knob -> [R]
    space: SearchSpace

    def __len__(self) -> int:
        return int(self.config_index.size)

    def notes(self) -> list[str]:
        return [f"skipped wl_weight={w} with cellBit={c}: a {c}-bit cell cannot slice {w - 1} magnitude bits"
                for w, c in self.space.skipped_pairs]


def explore_grid(space: SearchSpace) -> ExploreGrid:
    """The simulation points of `space` (unsliceable (wl_weight, cellBit) pairs skipped), each crossed
    with every combination of the cost-only knobs."""
    fields = list(space.choices)
    skipped = set(space.skipped_pairs)
    configs: dict[HWConfig, None] = {}
    for combo in itertools.product(*(space.choices[f] for f in fields)):
        values = dict(zip(fields, combo, strict=True))
        if (values["wl_weight"], values["cellBit"]) in skipped:
            continue
        configs[HWConfig(**values).canonical()] = None
    config_list = list(configs)
    if not config_list:
        raise UserError(f"{space.source}: no point is left once the unsliceable (wl_weight, cellBit) pairs "
                         f"{sorted(skipped)} are skipped")
    knob_names = list(COST_KNOBS)
    knob_combos = list(itertools.product(*(space.cost_choices[k] for k in knob_names)))
    config_index = np.repeat(np.arange(len(config_list)), len(knob_combos))
    knob_table = np.array(knob_combos, dtype=np.int64).reshape(len(knob_combos), len(knob_names))
    knobs = {name: np.tile(knob_table[:, i], len(config_list)) for i, name in enumerate(knob_names)}
    return ExploreGrid(config_list, config_index, knobs, space)


def statistics_combos(configs: Sequence[HWConfig]) -> list[tuple[int, int, int]]:
    """Every (wl_weight, subArray, cellBit) the points need, in first-seen order."""
    return list(dict.fromkeys((p.wl_weight, p.subArray, p.cellBit) for p in configs))


# ----------------------------------------------------------------------------------------------------
# NIPA, cost and fronts
# ----------------------------------------------------------------------------------------------------


@dataclass
class MetricOptions:
    """The options of nipa.estimation.metric.nipa_metric (see its docstring)."""

    reduction: str = "model_average"
    tile_factor: str = "tiles"
    device_model: str = "published"
    # The exploration space varies the input bits, which the published metric does not see (every front
    # point took 4-bit inputs and simulated 6 points worse): the input rounding term is on by default here.
    input_term: str = "rounding"


def config_arrays(configs: Sequence[HWConfig]) -> dict[str, np.ndarray]:
    """One array per HWConfig field over the configs."""
    dicts = [c.to_dict() for c in configs]
    return {name: np.array([d[name] for d in dicts]) for name in dicts[0]}


def rank_points(grid: ExploreGrid, stats: ModelStats, shapes: Sequence[LayerShape],
                coefficients: CostCoefficients, options: MetricOptions | None = None) -> dict[str, np.ndarray]:
    """Per row: the point's parameters, its NIPA (and log2), area, energy and latency. Arrays [R]."""
    options = options or MetricOptions()
    nipa = np.asarray(nipa_metric(stats, grid.configs, reduction=options.reduction,
                                  tile_factor=options.tile_factor, device_model=options.device_model,
                                  input_term=options.input_term),
                      dtype=np.float64)
    per_config = config_arrays(grid.configs)
    rows = {name: values[grid.config_index] for name, values in per_config.items()}
    rows.update(grid.knobs)
    cost = hardware_cost(shapes, rows["wl_weight"], rows["wl_input"], rows["subArray"], rows["ADCprecision"],
                         rows["cellBit"], rows["ADC_share"], rows["crossbar_columns"], coefficients)
    table = {name: rows[name] for name in POINT_COLUMNS}
    table["config_id"] = grid.config_index
    table["nipa"] = nipa[grid.config_index]
    table["log2_nipa"] = np.log2(table["nipa"])
    for name in COSTS:
        table[name] = cost[name]
    table["arrays"] = cost["arrays"]
    table["adcs"] = cost["adcs"]
    return table


def pareto_front(benefit: np.ndarray, cost: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Rows not dominated in (benefit up, cost down) among the rows of `mask`: a row is dominated when
    another has cost <= and benefit >= with one of them strict. Equal rows are all on the front.

    Vectorized: sort by cost, keep per cost value the best benefit, and compare it with the best
    benefit of every strictly cheaper row (a running maximum)."""
    benefit = np.asarray(benefit, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    keep = np.ones(benefit.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    front = np.zeros(benefit.shape, dtype=bool)
    index = np.flatnonzero(keep)
    if index.size == 0:
        return front
    costs, group = np.unique(cost[index], return_inverse=True)
    best_at_cost = np.full(costs.size, -np.inf)
    np.maximum.at(best_at_cost, group, benefit[index])
    best_cheaper = np.concatenate([[-np.inf], np.maximum.accumulate(best_at_cost)[:-1]])
    on = (benefit[index] == best_at_cost[group]) & (benefit[index] > best_cheaper[group])
    front[index[on]] = True
    return front


def budget_mask(table: dict[str, np.ndarray], budgets: dict[str, float | None]) -> np.ndarray:
    """Rows within every given budget ({cost column: maximum or None})."""
    mask = np.ones(table["nipa"].shape, dtype=bool)
    for name, limit in budgets.items():
        if limit is not None:
            mask &= table[name] <= limit
    return mask


def add_fronts(table: dict[str, np.ndarray], budgets: dict[str, float | None]) -> None:
    """within_budget and one front flag per cost (front_area_mm2, ...) in `table`."""
    within = budget_mask(table, budgets)
    table["within_budget"] = within
    for name in COSTS:
        table[f"front_{name}"] = pareto_front(table["nipa"], table[name], within)


def best_row(table: dict[str, np.ndarray], mask: np.ndarray, key: str = "nipa") -> int | None:
    """The row of highest `key` among `mask` (ties: the lowest energy, then the lowest area)."""
    index = np.flatnonzero(mask)
    if index.size == 0:
        return None
    order = np.lexsort((table["area_mm2"][index], table["energy_nj"][index], -table[key][index]))
    return int(index[order[0]])


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def write_csv(table: dict[str, np.ndarray], path: Path) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(table)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    return path


def plot_fronts(table: dict[str, np.ndarray], path: Path, title: str, max_dots: int = 40000,
                seed: int = 0) -> Path:
    """log2 NIPA against each cost (log scale), every point grey (a seeded subsample above `max_dots`),
    the front of each cost drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["nipa"].size
    shown = np.arange(rows)
    if rows > max_dots:
        shown = np.sort(np.random.default_rng(seed).choice(rows, max_dots, replace=False))
    fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4.2), sharey=True)
    for ax, name in zip(axes, COSTS, strict=True):
        ax.scatter(table[name][shown], table["log2_nipa"][shown], s=2, c="0.75", alpha=0.5, rasterized=True,
                   label=f"points ({rows:,}{'' if rows <= max_dots else f', {max_dots:,} drawn'})")
        on = np.flatnonzero(table[f"front_{name}"])
        on = on[np.argsort(table[name][on])]
        ax.step(table[name][on], table["log2_nipa"][on], where="post", color="C3", lw=1.2)
        ax.scatter(table[name][on], table["log2_nipa"][on], s=10, color="C3", label=f"front ({on.size})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel(COST_LABELS[name])
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("log2 NIPA (higher = more robust)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def describe_row(table: dict[str, np.ndarray], row: int) -> str:
    return (f"W{table['wl_weight'][row]} I{table['wl_input'][row]} S{table['subArray'][row]} "
            f"ADC{table['ADCprecision'][row]} c{table['cellBit'][row]} vari={table['vari'][row]:g} "
            f"SAF={table['SAF_prop'][row]:g} share={table['ADC_share'][row]} cols={table['crossbar_columns'][row]}: "
            f"log2 NIPA {table['log2_nipa'][row]:.2f}, {table['area_mm2'][row]:.3g} mm^2, "
            f"{table['energy_nj'][row]:.3g} nJ, {table['latency_us'][row]:.3g} us")


# ----------------------------------------------------------------------------------------------------
# Verification against the ground truth
# ----------------------------------------------------------------------------------------------------


def select_verification_points(table: dict[str, np.ndarray], n: int, seed: int = 0,
                               sample: str = "fronts") -> list[int]:
    """`n` distinct config ids. sample="fronts": the configs on any front first (spread evenly over their
    NIPA range when more than n), then one config per equal-width stratum of the space's log2 NIPA range
    (seeded draw within a stratum; empty strata are made up from the unchosen configs at random). The
    fronts are cheap, variation-free points: to judge the fast estimate over the whole space,
    sample="random" draws n configs uniformly (seeded, in the order drawn)."""
    if sample not in VERIFY_SAMPLES:
        raise ValueError(f"verification sample {sample!r}: expected one of {VERIFY_SAMPLES}")
    if n <= 0:
        return []
    config_ids = table["config_id"]
    if sample == "random":
        ids = np.unique(config_ids)
        return [int(i) for i in np.random.default_rng(seed).choice(ids, min(n, ids.size), replace=False)]
    log2_nipa = np.zeros(int(config_ids.max()) + 1)
    log2_nipa[config_ids] = table["log2_nipa"]
    on_front = np.zeros(table["nipa"].shape, dtype=bool)
    for name in COSTS:
        on_front |= table[f"front_{name}"]
    front_ids = np.unique(config_ids[on_front])
    front_ids = front_ids[np.argsort(-log2_nipa[front_ids], kind="stable")]
    if front_ids.size >= n:
        pick = np.unique(np.linspace(0, front_ids.size - 1, n).round().astype(int))
        return [int(i) for i in front_ids[pick]]
    chosen = [int(i) for i in front_ids]
    rng = np.random.default_rng(seed)
    rest = np.setdiff1d(np.unique(config_ids), front_ids)
    strata = n - len(chosen)
    lo, hi = log2_nipa[rest].min(initial=0.0), log2_nipa[rest].max(initial=0.0)
    edges = np.linspace(lo, hi, strata + 1)
    stratum = np.clip(np.searchsorted(edges, log2_nipa[rest], side="right") - 1, 0, strata - 1)
    for s in range(strata):
        members = rest[stratum == s]
        if members.size:
            chosen.append(int(rng.choice(members)))
    left = np.setdiff1d(rest, chosen)
    missing = min(n - len(chosen), left.size)
    if missing > 0:
        chosen.extend(int(i) for i in rng.choice(left, missing, replace=False))
    return chosen


@dataclass
class VerifySettings:
    points: int
    sample: str = "fronts"  # which points: see select_verification_points
    cycle: int = 3  # minimum chips per point
    target_se: float = 0.25  # accuracy points
    max_cycle: int = 20
    # "per_chip": every chip reads the test set in its own order (nipa.simulator.evaluate.chip_order), so a
    # dynamic ADC's dependence on the batch enters the chips' spread and its standard error
    test_order: str = "per_chip"
    fast_draws: int = 3  # draws of the fast estimate per point (at least, with fast_target_se)
    # Draws added until the standard error of the estimate's mean is at most this (at most max_cycle), as
    # the chips; None: fast_draws.
    fast_target_se: float | None = None
    fast_method: str = DEFAULT_METHOD
    calib_batches: int = DEFAULT_CALIB_BATCHES  # as wrap_error.py
    memory_mb: float | None = None  # None: nipa.runtime.default_memory_mb of the device
    bootstrap: int = 1000


@dataclass
class VerifyContext:
    """What the verification runs on (built by the caller from the loaded model and data)."""

    model: Any
    test_data: Any
    calib_inputs: list
    device: Any
    model_name: str
    dataset: str
    hw_file: str
    seed: int
    batch_size: int
    limit: int | None
    exclude: Sequence[str]
    include: Sequence[str] | None
    records_path: Path
    fast_records_path: Path
    weights: str | None = None  # sha256 of the weights (nipa.workloads.zoo.weights_sha256), in the sweep's settings
    extra: dict[str, Any] = field(default_factory=dict)


def simulate_adaptively(points: Sequence[HWConfig], ctx: VerifyContext, settings: VerifySettings,
                        log: Callable[[str], None] = print):
    """Simulate `points` with the ground-truth sweep until each has `settings.cycle` chips and a standard
    error below the target (at most max_cycle chips; nipa.pipelines.sweep.simulate_to_target). Resumable:
    chips already in the records are kept. Returns the grouped records of these points."""
    from nipa.pipelines.sweep import SweepSettings, simulate_to_target

    base = SweepSettings(model_name=ctx.model_name, dataset=ctx.dataset, hw_file=ctx.hw_file, sample_num=0,
                         cycle=settings.cycle, seed=ctx.seed, batch_size=ctx.batch_size, limit=ctx.limit,
                         exclude=ctx.exclude, include=ctx.include, memory_mb=settings.memory_mb, points=list(points),
                         weights=ctx.weights, device=str(ctx.device), test_order=settings.test_order,
                         extra={"explore": True, **ctx.extra})
    return simulate_to_target(base, ctx.model, ctx.test_data, ctx.calib_inputs, ctx.device, ctx.records_path,
                              settings.cycle, settings.max_cycle, settings.target_se, log)


def fast_estimates(grouped, stats: ModelStats, ctx: VerifyContext, settings: VerifySettings,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """wrap_error's method on the verified points: nipa.pipelines.wrap.compare's rows and summary."""
    from nipa.estimation.inject import AdcCalibration, InjectionModel, calibration_upstream
    from nipa.pipelines.wrap import FastMethod, GroundTruth, WrapSettings, cached_batches, compare, run_fast

    truth = GroundTruth.of(grouped, "top1", str(ctx.records_path))  # nipa.results.ground_truth's view
    errors = InjectionModel.of(settings.fast_method)
    wrap_settings = WrapSettings(model_name=ctx.model_name, dataset=ctx.dataset, cycle=settings.fast_draws,
                                 target_se=settings.fast_target_se,
                                 max_cycle=max(settings.max_cycle, settings.fast_draws), seed=ctx.seed,
                                 errors=errors, calib_batches=settings.calib_batches,
                                 exclude=ctx.exclude, include=ctx.include, batch_size=ctx.batch_size,
                                 limit=ctx.limit, test_order=truth.run.get("test_order", "fixed"))
    calibration = None
    if errors.adc == "measured":
        calibration = AdcCalibration(ctx.model, ctx.calib_inputs[:settings.calib_batches], exclude=ctx.exclude,
                                     include=ctx.include, memory_mb=settings.memory_mb, seed=ctx.seed,
                                     upstream=calibration_upstream(errors))
    fast = FastMethod(ctx.model, wrap_settings, stats, calibration, ctx.device)
    records = run_fast(truth, fast, cached_batches(ctx.test_data, ctx.device), ctx.fast_records_path, log)
    return compare(truth, records, wrap_settings.most_draws)


def regret_table(table: dict[str, np.ndarray], simulated: dict[int, float], predicted: dict[int, float],
                 budgets: dict[str, list[float]]) -> list[dict[str, Any]]:
    """For each cost budget: among the rows whose config was simulated and that fit the budget, the best
    simulated accuracy minus the simulated accuracy of the row NIPA ranks first (and of the row the fast
    estimate ranks first). Also whether NIPA's choice over the whole space under the budget was simulated."""
    config_ids = table["config_id"]
    verified = np.isin(config_ids, list(simulated))
    sim = np.array([simulated.get(int(i), np.nan) for i in config_ids])
    pred = np.array([predicted.get(int(i), np.nan) for i in config_ids])
    out = []
    for name, limits in budgets.items():
        for limit in limits:
            under = table[name] <= limit
            rows = verified & under
            if not rows.any():
                out.append({"cost": name, "budget": float(limit), "points": 0})
                continue
            best = float(np.nanmax(sim[rows]))
            pick = best_row(table, rows)
            space_pick = best_row(table, under)
            entry = {"cost": name, "budget": float(limit), "points": int(np.unique(config_ids[rows]).size),
                     "best_simulated": best, "nipa_pick": int(config_ids[pick]),
                     "nipa_pick_simulated": float(sim[pick]), "regret_nipa": best - float(sim[pick]),
                     "space_pick_simulated": bool(space_pick is not None and verified[space_pick])}
            if np.isfinite(pred[rows]).any():
                with_pred = rows & np.isfinite(pred)
                fast_pick = best_row({**table, "predicted": np.where(with_pred, pred, -np.inf)}, with_pred,
                                     key="predicted")
                entry["regret_fast"] = best - float(sim[fast_pick])
            out.append(entry)
    return out


def verification_budgets(table: dict[str, np.ndarray], config_ids: Sequence[int],
                         given: dict[str, float | None]) -> dict[str, list[float]]:
    """A few budgets per cost: the 25th, 50th and 75th percentiles of the cheapest cost-knob row of each
    verified config, plus the budgets the user gave."""
    budgets: dict[str, list[float]] = {}
    rows = np.isin(table["config_id"], list(config_ids))
    for name in COSTS:
        cheapest = {}
        for cid, value in zip(table["config_id"][rows], table[name][rows], strict=True):
            cheapest[int(cid)] = min(value, cheapest.get(int(cid), math.inf))
        values = np.array(list(cheapest.values()))
        limits = [float(np.percentile(values, q)) for q in (25, 50, 75)] if values.size else []
        if given.get(name) is not None:
            limits.append(float(given[name]))
        budgets[name] = sorted(set(limits))
    return budgets


def verify(table: dict[str, np.ndarray], grid: ExploreGrid, stats: ModelStats, ctx: VerifyContext,
           settings: VerifySettings, budgets: dict[str, float | None], summary_path: Path, plot_path: Path,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole verification (see the module docstring); writes the summary JSON and the plot."""
    from nipa.results.correlation import agreement, noise_ceiling
    from nipa.runtime import default_memory_mb

    if settings.memory_mb is None:  # sized for the device (a GPU's free memory)
        settings = replace(settings, memory_mb=default_memory_mb(ctx.device))
    started = time.perf_counter()
    chosen = select_verification_points(table, settings.points, seed=ctx.seed, sample=settings.sample)
    configs = [grid.configs[i] for i in chosen]
    log(f"verifying {len(configs)} points ({settings.cycle} to {settings.max_cycle} chips, target standard error "
        f"{settings.target_se} accuracy points) -> {ctx.records_path}")
    grouped = simulate_adaptively(configs, ctx, settings, log)
    by_key = {p.key: p for p in grouped.points}
    comparison = fast_estimates(grouped, stats, ctx, settings, log)
    predicted_by_key = {r["config_key"]: r["predicted"] for r in comparison["rows"]}
    trust_by_key = {r["config_key"]: (r.get("relative_adc_error"), r.get("trusted")) for r in comparison["rows"]}

    log2_of_config = dict(zip(table["config_id"].tolist(), table["log2_nipa"].tolist(), strict=True))
    on_front = np.zeros(table["nipa"].shape, dtype=bool)
    for name in COSTS:
        on_front |= table[f"front_{name}"]
    front_ids = set(table["config_id"][on_front].tolist())
    rows, simulated, predicted = [], {}, {}
    for cid, config in zip(chosen, configs, strict=True):
        point = by_key[config.key()]
        se = standard_error(point.top1) if len(point.top1) > 1 else None
        simulated[cid] = point.top1_mean
        if config.key() in predicted_by_key:
            predicted[cid] = predicted_by_key[config.key()]
        rows.append({"config_id": cid, "point": config.describe(), "config_key": config.key(),
                     "log2_nipa": log2_of_config[cid], "on_front": cid in front_ids,
                     "simulated": point.top1_mean, "chips": point.num_chips,
                     "chip_std": None if point.num_chips < 2 else point.top1_std,
                     "standard_error": None if se is None or not math.isfinite(se) else se,
                     "target_reached": bool(se is not None and se <= settings.target_se)
                     or identical_chips(config, settings.test_order),
                     "predicted": predicted.get(cid),
                     # how far to trust the estimate there (nipa.estimation.reliability)
                     "relative_adc_error": trust_by_key.get(config.key(), (None, None))[0],
                     "fast_trusted": trust_by_key.get(config.key(), (None, None))[1]})
    x = [r["log2_nipa"] for r in rows]
    y = [r["simulated"] for r in rows]
    nipa_agreement = agreement(x, y, bootstrap=settings.bootstrap, seed=ctx.seed)
    with_fast = [r for r in rows if r["predicted"] is not None]
    fast_agreement = agreement([r["predicted"] for r in with_fast], [r["simulated"] for r in with_fast],
                               bootstrap=settings.bootstrap, seed=ctx.seed)
    ceiling = noise_ceiling(grouped.points, seed=ctx.seed)
    regrets = regret_table(table, simulated, predicted, verification_budgets(table, chosen, budgets))
    nipa_regrets = [r["regret_nipa"] for r in regrets if "regret_nipa" in r]
    fast_regrets = [r["regret_fast"] for r in regrets if "regret_fast" in r]
    summary = {
        "model": ctx.extra.get("model_id", ctx.model_name), "dataset": ctx.extra.get("dataset_id", ctx.dataset),
        "hw_file": ctx.hw_file, "points": len(rows), "records": str(ctx.records_path),
        "fast_records": str(ctx.fast_records_path), "ideal_top1": grouped.ideal_top1,
        "cycle_min": settings.cycle, "max_cycle": settings.max_cycle, "target_se": settings.target_se,
        "chips_total": int(sum(r["chips"] for r in rows)),
        "points_below_target_se": int(sum(r["target_reached"] for r in rows)),
        "kendall_nipa": nipa_agreement.kendall.to_dict()["value"],
        "kendall_nipa_ci": [nipa_agreement.kendall.to_dict()["ci_low"], nipa_agreement.kendall.to_dict()["ci_high"]],
        "spearman_nipa": nipa_agreement.spearman.to_dict()["value"],
        "kendall_fast": fast_agreement.kendall.to_dict()["value"],
        "kendall_fast_ci": [fast_agreement.kendall.to_dict()["ci_low"], fast_agreement.kendall.to_dict()["ci_high"]],
        "kendall_noise_ceiling": ceiling.get("kendall"),
        "fast_method": settings.fast_method, "fast_draws": settings.fast_draws,
        "fast_target_se": settings.fast_target_se,
        "fast_mean_abs_error": comparison["summary"].get("mean_abs_error"),
        "fast_max_abs_error": comparison["summary"].get("max_abs_error"),
        "fast_trust": comparison["summary"].get("trust"),
        "regret_nipa_max": max(nipa_regrets) if nipa_regrets else None,
        "regret_nipa_mean": float(np.mean(nipa_regrets)) if nipa_regrets else None,
        "regret_fast_max": max(fast_regrets) if fast_regrets else None,
        "regret": regrets, "agreement_nipa": nipa_agreement.to_dict(), "agreement_fast": fast_agreement.to_dict(),
        "noise_ceiling": ceiling, "rows": rows, "seconds": round(time.perf_counter() - started, 2),
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    plot_verification(rows, summary, plot_path)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def plot_verification(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    """Left: log2 NIPA against the simulated accuracy (standard-error bars, front points marked);
    right: the fast estimate against the simulated accuracy with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    sim = np.array([r["simulated"] for r in rows])
    err = np.array([r["standard_error"] or 0.0 for r in rows])
    x = np.array([r["log2_nipa"] for r in rows])
    front = np.array([r["on_front"] for r in rows], dtype=bool)
    for mask, label, color in ((front, "on a front", "C3"), (~front, "off the fronts", "C0")):
        if mask.any():
            left.errorbar(x[mask], sim[mask], yerr=err[mask], fmt="o", ms=4, color=color, label=label, capsize=2)
    left.set_xlabel("log2 NIPA")
    left.set_ylabel("simulated top-1 (%) (mean of chips, +- standard error)")
    left.set_title(f"NIPA: Kendall tau {fmt(summary['kendall_nipa'])} (noise ceiling "
                   f"{fmt(summary['kendall_noise_ceiling'])}), max regret {fmt(summary['regret_nipa_max'])}",
                   fontsize=9)
    left.legend(fontsize=8)
    with_fast = [r for r in rows if r["predicted"] is not None]
    if with_fast:
        p = np.array([r["predicted"] for r in with_fast])
        s = np.array([r["simulated"] for r in with_fast])
        right.scatter(s, p, s=16)
        lo, hi = min(p.min(), s.min()) - 0.5, max(p.max(), s.max()) + 0.5
        right.plot([lo, hi], [lo, hi], "k--", lw=1)
    right.set_xlabel("simulated top-1 (%)")
    right.set_ylabel(f"fast estimate ({summary['fast_method']}) top-1 (%)")
    right.set_title(f"fast estimate: Kendall tau {fmt(summary['kendall_fast'])}, MAE "
                    f"{fmt(summary['fast_mean_abs_error'])}", fontsize=9)
    fig.suptitle(f"{summary['model']} / {summary['dataset']}: {summary['points']} verified points", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The pipeline of explore.py
# ----------------------------------------------------------------------------------------------------


@dataclass
class ExploreSettings:
    model_name: str
    dataset: str
    hw_file: str = "HW_config/Explore_space.ini"
    ckpt_dir: str = "ckpts"
    ckpt: str | None = None
    data_root: str = "data"
    batch_size: int | None = None
    limit: int | None = None
    num_workers: int = 0
    exclude: Sequence[str] = ()
    include: Sequence[str] | None = None
    block: int | str | None = None  # --block: N, a list, ranges, spread:N, all
    tokens: int = 1  # language models: tokens per inference for the cost
    random_init: bool = False  # untrained weights (tests only)
    seed: int = 0
    device: str = "auto"
    gpu_id: int | None = None
    budgets: dict[str, float | None] = field(default_factory=dict)  # cost column -> maximum
    metric: MetricOptions = field(default_factory=MetricOptions)
    out_dir: str | None = None  # default results/{model}
    verify: VerifySettings | None = None  # points=0: no verification, only the chips of --per_layer's points
    records: str | None = None  # ground-truth records (default {out_dir}/{dataset}_explore_accsim.jsonl)
    per_layer: Any = None  # nipa.pipelines.layer_search.PerLayerSettings: the per-layer search (explore.py --per_layer)


def _example_input(model_name: str, dataset: str, tokens: int):
    import torch

    from nipa.llm.load import is_llm_name
    from nipa.workloads.datasets import dataset_info

    if is_llm_name(model_name):
        return {"input_ids": torch.zeros((1, tokens), dtype=torch.long)}
    info = dataset_info(dataset)
    return torch.zeros(1, info.in_channels, info.image_size, info.image_size)


def run_explore(settings: ExploreSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """explore.py after argument parsing. Returns a summary dict (paths, timings, best points)."""
    import torch

    from nipa.estimation.stats import model_statistics
    from nipa.hardware.mapping import select_layers
    from nipa.llm.load import is_llm_name, load_causal_lm
    from nipa.runtime import resolve_device, seed_everything
    from nipa.workloads.zoo import (
        build_model,
        dataset_id,
        layer_selection,
        load_model_and_data,
        load_trained_model,
        model_id,
    )

    started = time.perf_counter()
    space = SearchSpace.from_ini(settings.hw_file, skip_unsliceable=True)  # bad values fail here, first
    coefficients = CostCoefficients.with_overrides(space.cost_overrides)
    grid = explore_grid(space)
    for note in grid.notes():
        log(f"note: {note}")
    log(f"{settings.hw_file}: {len(grid.configs):,} simulation points x "
        f"{len(grid) // len(grid.configs)} cost-knob combinations = {len(grid):,} points"
        + (f"; [Cost] overrides {space.cost_overrides}" if space.cost_overrides else ""))

    device = resolve_device(settings.device, settings.gpu_id)
    seed_everything(settings.seed)
    test_data, meta = None, {}
    if settings.verify is not None:
        model, meta, test_data = load_model_and_data(
            settings.model_name, settings.dataset, ckpt_dir=settings.ckpt_dir, ckpt=settings.ckpt,
            data_root=settings.data_root, batch_size=settings.batch_size, device=device,
            num_workers=settings.num_workers, limit=settings.limit)
    elif is_llm_name(settings.model_name):
        model, meta = load_causal_lm(settings.model_name)
    elif settings.random_init:
        torch.manual_seed(settings.seed)
        model = build_model(settings.model_name, settings.dataset).eval()
    else:
        model, meta = load_trained_model(settings.model_name, settings.dataset, settings.ckpt_dir, settings.ckpt)
    include, exclude = layer_selection(settings.model_name, model, settings.include, list(settings.exclude),
                                       settings.block)
    layers = select_layers(model, exclude, include)
    loaded = time.perf_counter()

    stats = model_statistics(model, statistics_combos(grid.configs), exclude, include,
                             model_name=model_id(settings.model_name),
                             dataset=dataset_id(settings.model_name, settings.dataset))
    stats_s = time.perf_counter() - loaded
    example = _example_input(settings.model_name, settings.dataset, settings.tokens)
    if isinstance(example, dict):
        example = {k: v.to(next(model.parameters()).device) for k, v in example.items()}
    else:
        example = example.to(next(model.parameters()).device)
    shapes = layer_shapes(model, layers, example)
    ranked_at = time.perf_counter()
    table = rank_points(grid, stats, shapes, coefficients, settings.metric)
    add_fronts(table, settings.budgets)
    rank_s = time.perf_counter() - ranked_at

    out_dir = Path(settings.out_dir or paths.model_dir(model_id(settings.model_name)))
    stem = dataset_id(settings.model_name, settings.dataset)
    csv_path = write_csv(table, out_dir / f"{stem}_explore.csv")
    title = (f"{model_id(settings.model_name)} / {stem}: {len(grid):,} points of {Path(settings.hw_file).name}"
             + (f" (budgets {', '.join(f'{k} <= {v:g}' for k, v in settings.budgets.items() if v is not None)})"
                if any(v is not None for v in settings.budgets.values()) else ""))
    plot_path = plot_fronts(table, out_dir / f"{stem}_explore.png", title, seed=settings.seed)
    log(f"{len(layers)} mapped layers; statistics of {len(stats.combos)} (wl_weight, subArray, cellBit) in "
        f"{stats_s:.1f} s; NIPA and cost of {len(grid):,} points in {rank_s:.2f} s")
    within = table["within_budget"]
    log(f"{int(within.sum()):,} points within the budgets; front sizes: "
        + ", ".join(f"{name} {int(table[f'front_{name}'].sum())}" for name in COSTS))
    best = best_row(table, within)
    if best is not None:
        log(f"highest NIPA within the budgets: {describe_row(table, best)}")
    for name in COSTS:
        cheapest = best_row({**table, "neg": -table[name]}, table[f"front_{name}"], key="neg")
        if cheapest is not None:
            log(f"cheapest in {name} on its front: {describe_row(table, cheapest)}")
    result: dict[str, Any] = {"csv": str(csv_path), "plot": str(plot_path), "points": len(grid),
                              "simulation_points": len(grid.configs), "layers": [s.__dict__ for s in shapes],
                              "statistics_s": stats_s, "rank_s": rank_s,
                              "best_row": best, "coefficients": coefficients.__dict__}
    log(f"wrote {csv_path} and {plot_path}")

    if settings.verify is not None:
        from nipa.workloads.zoo import calibration_inputs, default_batch_size, weights_file, weights_sha256

        batch_size = settings.batch_size or default_batch_size(settings.model_name)
        calib = calibration_inputs(settings.model_name, settings.dataset, test_data, settings.verify.calib_batches,
                                   data_root=settings.data_root, batch_size=batch_size, seed=settings.seed)
        records = Path(settings.records or out_dir / f"{stem}_explore_accsim.jsonl")
        ctx = VerifyContext(model=model, test_data=test_data, calib_inputs=calib, device=device,
                            model_name=settings.model_name, dataset=settings.dataset, hw_file=settings.hw_file,
                            seed=settings.seed, batch_size=batch_size, limit=settings.limit, exclude=exclude,
                            include=include, records_path=records,
                            fast_records_path=records.with_name(f"{stem}_explore_wrap.jsonl"),
                            weights=weights_sha256(weights_file(settings.model_name, settings.dataset,
                                                                settings.ckpt_dir, settings.ckpt, meta)),
                            extra={"checkpoint_top1": meta.get("test_top1"),
                                   "model_id": model_id(settings.model_name), "dataset_id": stem})
        if settings.verify.points > 0:
            summary = verify(table, grid, stats, ctx, settings.verify, settings.budgets,
                             out_dir / f"{stem}_explore_summary.json", out_dir / f"{stem}_explore_verify.png", log)
            result["verify"] = summary
            result["summary"] = str(out_dir / f"{stem}_explore_summary.json")
    if settings.per_layer is not None:
        result["per_layer"] = per_layer_search(settings, space, grid, stats, shapes, coefficients,
                                               ctx if settings.verify is not None else None, out_dir / stem, log)
    result["seconds"] = time.perf_counter() - started
    return result


def simulate_points(points: Sequence[Any], ctx: VerifyContext, settings: VerifySettings,
                    log: Callable[[str], None] = print) -> dict[str, tuple[float, int, float | None]]:
    """Ground truth of uniform and per-layer points: {config_key: (mean top-1, chips, standard error)}.
    Per-layer points go to their own records file ({records stem}_per_layer.jsonl, its run marked per_layer),
    so a uniform and a per-layer sweep never share one."""
    from nipa.runtime import default_memory_mb

    if settings.memory_mb is None:
        settings = replace(settings, memory_mb=default_memory_mb(ctx.device))
    uniform = [p for p in points if isinstance(p, HWConfig)]
    layered = [p for p in points if not isinstance(p, HWConfig)]
    per_layer_path = ctx.records_path.with_name(f"{ctx.records_path.stem}_per_layer{ctx.records_path.suffix}")
    out: dict[str, tuple[float, int, float | None]] = {}
    for subset, path in ((uniform, ctx.records_path), (layered, per_layer_path)):
        if not subset:
            continue
        grouped = simulate_adaptively(subset, replace(ctx, records_path=path), settings, log)
        for point in grouped.points:
            se = standard_error(point.top1) if point.num_chips > 1 else None
            out[point.key] = (point.top1_mean, point.num_chips, se if se is not None and math.isfinite(se) else None)
    return out


def per_layer_search(settings: ExploreSettings, space: SearchSpace, grid: ExploreGrid, stats: ModelStats,
                     shapes: Sequence[LayerShape], coefficients: CostCoefficients, ctx: VerifyContext | None,
                     stem: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """explore.py --per_layer (nipa.pipelines.layer_search): the searches, simulated when `ctx` is given; written to
    {stem}_explore_per_layer.json and, when the verification summary exists, under its "per_layer" key."""
    from nipa.pipelines.layer_search import run_per_layer

    simulate = None
    if ctx is not None:
        def simulate(points: Sequence[Any]) -> dict[str, tuple[float, int, float | None]]:
            return simulate_points(points, ctx, settings.verify, log)
    summary = run_per_layer(stats, shapes, space, grid.configs, coefficients, settings.per_layer, simulate, log)
    if ctx is not None:
        summary["records"] = str(ctx.records_path)
    path = stem.with_name(f"{stem.name}_explore_per_layer.json")
    path.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    summary_path = stem.with_name(f"{stem.name}_explore_summary.json")
    if summary_path.is_file():
        verified = json.loads(summary_path.read_text())
        verified["per_layer"] = summary
        summary_path.write_text(json.dumps(verified, indent=1, default=_json_default) + "\n")
    log(f"per-layer search: {summary['per_layer_wins']} of {summary['compared']} budgets simulated better than the "
        f"uniform point of highest NIPA within the same budget -> {path}")
    return summary


def outcome_lines(result: dict[str, Any]) -> list[str]:
    """The closing lines explore.py prints for run_explore's result: the verification's agreement and
    regret, the per-layer search's gain, the time taken."""
    lines = []
    summary = result.get("verify")
    if summary:
        def fmt(value):
            return "n/a" if value is None else f"{value:.3f}"
        lines.append(
            f"verified {summary['points']} points ({summary['chips_total']} chips): Kendall tau NIPA "
            f"{fmt(summary['kendall_nipa'])} (noise ceiling {fmt(summary['kendall_noise_ceiling'])}), fast "
            f"estimate {fmt(summary['kendall_fast'])} with mean |error| {fmt(summary['fast_mean_abs_error'])}; "
            f"regret of NIPA's choice: max {fmt(summary['regret_nipa_max'])}, mean {fmt(summary['regret_nipa_mean'])}"
            f" accuracy points -> {result['summary']}")
        trust = summary.get("fast_trust")
        if trust:
            lines.append("fast estimate per trust (ADC error at most "
                         f"{trust['ratio']:g} of the signal in every layer): trusted {trust['trusted']['points']} "
                         f"points, mean |error| {fmt(trust['trusted']['mean_abs_error'])}, max "
                         f"{fmt(trust['trusted']['max_abs_error'])}; untrusted {trust['untrusted']['points']} points, "
                         f"mean |error| {fmt(trust['untrusted']['mean_abs_error'])}, max "
                         f"{fmt(trust['untrusted']['max_abs_error'])}")
    per_layer = result.get("per_layer")
    if per_layer and per_layer["compared"]:
        lines.append(
            f"per-layer search: simulated gain over the best uniform point of the same budget: mean "
            f"{per_layer['per_layer_gain_mean']:+.2f}, worst {per_layer['per_layer_gain_min']:+.2f} accuracy points "
            f"({per_layer['per_layer_wins']} of {per_layer['compared']} budgets better)")
    lines.append(f"done in {result['seconds']:.1f} s")
    return lines
