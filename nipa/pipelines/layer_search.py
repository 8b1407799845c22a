"""Per-layer configurations found by NIPA (explore.py --per_layer).

Start from a uniform hardware point and spend a cost budget where the per-layer NIPA says it buys the
most: at every step each mapped layer may take the next higher value the exploration space lists for
one of its per-layer fields (ADC bits, weight bits, input bits; `nipa.hardware.config.LAYER_FIELDS`); the move of
largest log2 NIPA gain per unit of added cost that stays within the budget is taken (a move that adds no
cost and gains is taken first), until no move gains. The metric is NIPA with the ``layer_sum`` reduction,
the reduction that scores a per-layer point (every layer's terms at its own effective point), and the
cost is nipa.hardware.cost's model with each layer at its own point.

The search is greedy (no backtracking and no move that lowers a layer), so it finds a good allocation,
not the best one; `search` records every step so the path can be read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nipa.errors import UserError
from nipa.estimation.metric import nipa_metric
from nipa.estimation.stats import ModelStats
from nipa.hardware.config import HWConfig, PerLayerConfig, SearchSpace, layered
from nipa.hardware.cost import LAYER_COST_FIELDS, CostCoefficients, LayerShape, hardware_cost, layer_arrays

SEARCH_FIELDS = ("ADCprecision", "wl_weight", "wl_input")


@dataclass
class SearchOptions:
    """What the search may change and how it scores (see the module docstring)."""

    cost: str = "energy_nj"  # the cost column the budget limits (nipa.pipelines.explore.COSTS)
    budget: float = math.inf
    fields: Sequence[str] = SEARCH_FIELDS
    adc_share: int = 16
    crossbar_columns: int = 256
    tile_factor: str = "tiles"
    device_model: str = "published"
    input_term: str = "rounding"
    adc_term: str = "ground_truth"
    max_steps: int = 200


@dataclass
class SearchResult:
    start: HWConfig
    point: HWConfig | PerLayerConfig
    nipa: float
    cost: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start.describe(), "start_key": self.start.key(), "point": self.point.describe(),
                "config_key": self.point.key(), "config": self.point.to_dict(), "log2_nipa": math.log2(self.nipa),
                **self.cost, "steps": self.steps}


def search_nipa(stats: ModelStats, points: Sequence[HWConfig | PerLayerConfig], options: SearchOptions) -> np.ndarray:
    """NIPA of points (uniform or per-layer) as the search scores them (layer_sum reduction)."""
    return np.atleast_1d(nipa_metric(stats, list(points), reduction="layer_sum", tile_factor=options.tile_factor,
                                     device_model=options.device_model, adc_term=options.adc_term,
                                     input_term=options.input_term))


def points_cost(shapes: Sequence[LayerShape], points: Sequence[HWConfig | PerLayerConfig], options: SearchOptions,
                coefficients: CostCoefficients) -> dict[str, np.ndarray]:
    """Area, energy and latency [N] of points, every layer at its own effective point."""
    values = layer_arrays(shapes, points)
    return hardware_cost(shapes, *(values[f] for f in LAYER_COST_FIELDS), options.adc_share,
                         options.crossbar_columns, coefficients)


def _moves(point: HWConfig | PerLayerConfig, start: HWConfig, layers: Sequence[str], space: SearchSpace,
           fields: Sequence[str]) -> list[tuple[str, str, int, HWConfig | PerLayerConfig]]:
    """(layer, field, new value, point) for every one-step raise of one layer's field to the next value
    the space lists; moves that make a layer unsliceable (cellBit wider than its weight) are left out."""
    overrides = {name: {} for name in layers}
    for name in layers:
        own = point.for_layer(name) if isinstance(point, PerLayerConfig) else point
        for f in fields:
            if getattr(own, f) != getattr(start, f):
                overrides[name][f] = getattr(own, f)
    moves = []
    for name in layers:
        own = point.for_layer(name) if isinstance(point, PerLayerConfig) else point
        for f in fields:
            higher = sorted(v for v in space.choices[f] if v > getattr(own, f))
            if not higher:
                continue
            if f == "wl_weight" and own.cellBit > higher[0] - 1:
                continue
            trial = {n: dict(o) for n, o in overrides.items()}
            trial[name][f] = higher[0]
            moves.append((name, f, higher[0], layered(start, {n: o for n, o in trial.items() if o})))
    return moves


def search(stats: ModelStats, shapes: Sequence[LayerShape], space: SearchSpace, start: HWConfig,
           options: SearchOptions, coefficients: CostCoefficients | None = None) -> SearchResult:
    """The greedy per-layer search from the uniform `start` under `options.budget` (module docstring)."""
    coefficients = coefficients or CostCoefficients()
    unknown = [f for f in options.fields if f not in SEARCH_FIELDS]
    if unknown:
        raise UserError(f"per-layer search fields {unknown}: choose among {', '.join(SEARCH_FIELDS)}")
    layers = [s.name for s in shapes]
    if list(stats.layers) != layers:
        raise UserError(f"statistics of layers {list(stats.layers)} and cost shapes of {layers} differ")
    point: HWConfig | PerLayerConfig = start
    nipa = float(search_nipa(stats, [point], options)[0])
    cost = {k: float(v[0]) for k, v in points_cost(shapes, [point], options, coefficients).items()
            if k in ("area_mm2", "energy_nj", "latency_us")}
    if cost[options.cost] > options.budget:
        raise UserError(f"the start point {start.describe()} costs {cost[options.cost]:.4g} {options.cost}, above the "
                        f"budget {options.budget:.4g}")
    steps: list[dict[str, Any]] = []
    for _ in range(options.max_steps):
        moves = _moves(point, start, layers, space, options.fields)
        if not moves:
            break
        candidates = [m[3] for m in moves]
        values = search_nipa(stats, candidates, options)
        costs = points_cost(shapes, candidates, options, coefficients)
        gain = np.log2(values) - math.log2(nipa)
        added = costs[options.cost] - cost[options.cost]
        fits = costs[options.cost] <= options.budget
        # gain per added cost; a move that adds no cost and gains comes first
        score = np.where(added > 0, gain / np.where(added > 0, added, 1.0), np.inf)
        score = np.where(fits & (gain > 1e-12), score, -np.inf)
        best = int(np.argmax(score))
        if score[best] == -np.inf:  # no move gains within the budget
            break
        layer, name, value, point = moves[best]
        nipa = float(values[best])
        cost = {k: float(costs[k][best]) for k in ("area_mm2", "energy_nj", "latency_us")}
        steps.append({"layer": layer, "field": name, "value": int(value), "log2_nipa": math.log2(nipa),
                      "gain": float(gain[best]), **cost})
    return SearchResult(start, point, nipa, cost, steps)


def best_uniform(stats: ModelStats, shapes: Sequence[LayerShape], configs: Sequence[HWConfig],
                 options: SearchOptions, coefficients: CostCoefficients,
                 budget: float | None = None) -> tuple[int | None, np.ndarray, dict[str, np.ndarray]]:
    """(index of the uniform config of highest search NIPA within `budget` (default options.budget),
    NIPA [N], cost {column: [N]}) at the search's cost knobs."""
    limit = options.budget if budget is None else budget
    values = search_nipa(stats, configs, options)
    arrays = {f: np.array([getattr(c, f) for c in configs], dtype=np.float64) for f in LAYER_COST_FIELDS}
    costs = hardware_cost(shapes, *(arrays[f] for f in LAYER_COST_FIELDS), options.adc_share,
                          options.crossbar_columns, coefficients)
    within = np.flatnonzero(costs[options.cost] <= limit)
    if within.size == 0:
        return None, values, costs
    order = np.lexsort((costs[options.cost][within], -values[within]))
    return int(within[order[0]]), values, costs


def with_device(config: HWConfig, reference: HWConfig) -> bool:
    """Whether `config` has the chip-wide device fields of `reference` (variation and stuck-at faults)."""
    fields = ("vari_type", "vari", "ind_vari", "laplace_b", "SAF_prop", "onoffratio", "adc_mode")
    return all(getattr(config, f) == getattr(reference, f) for f in fields)


def describe_steps(steps: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{s['layer']}.{s['field']}={s['value']}" for s in steps) or "(no step)"


# ----------------------------------------------------------------------------------------------------
# explore.py --per_layer: searches under a few budgets, verified against the ground truth
# ----------------------------------------------------------------------------------------------------


@dataclass
class PerLayerPlan:
    """One budget's search: its start, its result and the uniform point it is compared with."""

    budget: float
    start: HWConfig
    result: SearchResult
    uniform: HWConfig  # highest search NIPA among uniform points within the budget
    uniform_nipa: float
    uniform_cost: float


def plan_searches(stats: ModelStats, shapes: Sequence[LayerShape], space: SearchSpace, configs: Sequence[HWConfig],
                  options: SearchOptions, coefficients: CostCoefficients, budgets: Sequence[float],
                  start_fraction: float = 0.8) -> list[PerLayerPlan]:
    """For each budget B: start at the uniform point of highest NIPA within start_fraction B, search up to
    B, and find the uniform point of highest NIPA within B (all at the search's cost knobs)."""
    if not 0 < start_fraction <= 1:
        raise UserError(f"--per_layer_start {start_fraction}: must lie in (0, 1]")
    plans = []
    for budget in budgets:
        start_index, _, _ = best_uniform(stats, shapes, configs, options, coefficients, start_fraction * budget)
        uniform_index, values, costs = best_uniform(stats, shapes, configs, options, coefficients, budget)
        if start_index is None or uniform_index is None:
            raise UserError(f"no uniform point costs at most {start_fraction * budget:.4g} {options.cost}: raise the "
                            "per-layer budget")
        result = search(stats, shapes, space, configs[start_index], SearchOptions(**{**options.__dict__,
                                                                                    "budget": budget}),
                        coefficients)
        plans.append(PerLayerPlan(budget, configs[start_index], result, configs[uniform_index],
                                  float(values[uniform_index]), float(costs[options.cost][uniform_index])))
    return plans


@dataclass
class PerLayerSettings:
    """explore.py --per_layer: the searches' options, their budgets (None: the 5th, 10th, 25th and 50th
    percentiles of the cost over the space's points without device error) and how to simulate them."""

    options: SearchOptions = field(default_factory=SearchOptions)
    budgets: Sequence[float] | None = None
    start_fraction: float = 0.8
    simulate: bool = True  # verify with the ground truth (needs the trained model and its test data)


def default_budgets(shapes: Sequence[LayerShape], configs: Sequence[HWConfig], options: SearchOptions,
                    coefficients: CostCoefficients) -> list[float]:
    clean = [c for c in configs if not c.has_device_error] or list(configs)
    values = points_cost(shapes, clean, options, coefficients)[options.cost]
    return [float(np.percentile(values, q)) for q in (5, 10, 25, 50)]


def run_per_layer(stats: ModelStats, shapes: Sequence[LayerShape], space: SearchSpace, configs: Sequence[HWConfig],
                  coefficients: CostCoefficients, settings: PerLayerSettings, simulate=None,
                  log=print) -> dict[str, Any]:
    """Plan the searches and, with `simulate` (a function of a list of points -> {config_key: (mean top-1,
    chips, standard error or None)}), verify each result against its start and the uniform point of highest
    NIPA within the same budget. Returns the JSON-ready summary."""
    options = settings.options
    budgets = list(settings.budgets or default_budgets(shapes, configs, options, coefficients))
    plans = plan_searches(stats, shapes, space, configs, options, coefficients, budgets, settings.start_fraction)
    simulated: dict[str, Any] = {}
    if simulate is not None:
        points = list(dict.fromkeys([p.result.point for p in plans] + [p.uniform for p in plans]
                                    + [p.start for p in plans]))
        simulated = simulate(points)
    rows = []
    for plan in plans:
        result = plan.result

        def sim(point: Any, what: str) -> dict[str, Any]:
            top1, chips, se = simulated.get(point.key(), (None, None, None))
            return {f"{what}_simulated": top1, f"{what}_chips": chips, f"{what}_standard_error": se}

        row = {"cost": options.cost, "budget": plan.budget, "per_layer": result.to_dict(),
               "per_layer_log2_nipa": math.log2(result.nipa), "per_layer_cost": result.cost[options.cost],
               "uniform": plan.uniform.describe(), "uniform_key": plan.uniform.key(),
               "uniform_log2_nipa": math.log2(plan.uniform_nipa), "uniform_cost": plan.uniform_cost,
               "start": plan.start.describe(),
               "start_log2_nipa": math.log2(float(search_nipa(stats, [plan.start], options)[0])),
               **sim(result.point, "per_layer"), **sim(plan.uniform, "uniform"), **sim(plan.start, "start")}
        if row["per_layer_simulated"] is not None and row["uniform_simulated"] is not None:
            row["gain_over_uniform"] = row["per_layer_simulated"] - row["uniform_simulated"]
        rows.append(row)
        log(f"per-layer search, {options.cost} <= {plan.budget:.4g}: {result.point.describe()} (log2 NIPA "
            f"{row['per_layer_log2_nipa']:.2f}, {row['per_layer_cost']:.4g}; {describe_steps(result.steps)}) "
            f"against uniform {plan.uniform.describe()} (log2 NIPA {row['uniform_log2_nipa']:.2f}, "
            f"{plan.uniform_cost:.4g})"
            + (f": simulated {row['per_layer_simulated']:.2f} vs {row['uniform_simulated']:.2f} (start "
               f"{row['start_simulated']:.2f})" if "gain_over_uniform" in row else ""))
    gains = [r["gain_over_uniform"] for r in rows if "gain_over_uniform" in r]
    return {"cost": options.cost, "fields": list(options.fields), "adc_share": options.adc_share,
            "crossbar_columns": options.crossbar_columns, "start_fraction": settings.start_fraction,
            "metric": {"reduction": "layer_sum", "tile_factor": options.tile_factor,
                       "device_model": options.device_model, "input_term": options.input_term,
                       "adc_term": options.adc_term},
            "budgets": budgets, "rows": rows,
            "per_layer_gain_mean": float(np.mean(gains)) if gains else None,
            "per_layer_gain_min": float(min(gains)) if gains else None,
            "per_layer_wins": int(sum(g > 0 for g in gains)), "per_layer_ties": int(sum(g == 0 for g in gains)),
            "compared": len(gains)}
