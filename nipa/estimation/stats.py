"""Per-layer, per-slice bit statistics of the weights (SPEC section 5), the input of the NIPA metric.

For one mapped layer and one (wl_weight b, subArray S, cellBit c) combination the weight matrix
W [out, fan_in] is tiled, quantized per (output channel, tile) and sliced exactly as the simulator does
(`nipa.hardware.quant`, SPEC section 4 steps 1-3). A *tile row* is one output channel in one tile: the S cells of
one crossbar column that one ADC read sums. Per slice k we record

- ``var[k]``: the (population) variance of the signed slice values s_k over the cells of a tile row,
  averaged over all (channel, tile) pairs;
- ``density[k]`` = 1 - sparsity: the fraction of those cells with s_k != 0, averaged the same way;
- ``mean_sq[k]``: the mean of s_k^2 the same way (the per-cell level power; state-dependent device
  errors scale with it; recorded for the error-injection method, unused by the published metric);
- ``mean_abs[k]``: the mean of |s_k| the same way (the mean level of the cell that holds the slice; a
  stuck-at-1 cell's error depends on it; used by the metric's ``device_model="cells"``; for 1-bit
  cells it equals density[k]). Files of format version 1 lack it (loaded as None);
- ``tile_range_ratio[k]``: how much an ADC range shared by the layer's tiles widens the read step over a
  range per tile. A tile's own range scales with its largest column magnitude R_t = max over output
  channels of sum_rows |s_k| (what a column reads when every input bit is on); a range over all tiles
  scales with max_t R_t. The ratio is max_t R_t / sqrt(mean_t R_t^2): 1 for one tile, larger when tiles
  differ (a short last tile, channels of unequal weight). Files before format version 3 lack it (None);

plus the tile count T, the fan-in and the float weight variance sigma_w^2 of the layer.

Zero padding. A layer whose fan-in is not a multiple of S has a short last tile (a layer with fan-in
below S has one short tile: the simulator gives it min(S, fan-in) rows). By default
(``count_padding=False``) every statistic of a tile row averages its real rows only, so the signal
sum_k 4^(ck) var_k, like the rounding noise Q = 1/12 it is compared with, is per real weight. With
``count_padding=True`` the padding cells count as zeros: S * density[k] is then the expected number of
non-zero cells in a padded column, but a short tile's signal shrinks by (real rows / S) while Q does
not, which makes weight rounding look far too costly for a layer such as a 9-input first convolution.
Measured on smallcnn/mnist5k (README, validate.py): real rows rank the ground truth better (Kendall tau
0.730 against 0.637 with 10 chips per random point). The record says which was used.

Model-level statistics are the plain average over the mapped layers (as the original tool did); the
per-layer values are kept as well. `model_statistics` produces every requested combination in one pass
over the layers: each layer's weight is read once, tiled once per subArray, quantized once per
(subArray, wl_weight), and the slices of every cellBit come from one histogram of the quantized levels
per tile row (a statistic of s_k is a fixed function of the level q, so sums over a tile row are the
histogram times a small level table), which avoids materializing K slice tensors per combination.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nipa import __version__
from nipa.errors import UserError
from nipa.hardware.config import HWConfig, SearchSpace
from nipa.hardware.mapping import select_layers
from nipa.hardware.quant import max_level, num_tiles, quantize_weight_tiles, slice_magnitude, tile_columns

STATS_FORMAT = "nipa-bit-statistics"
STATS_FORMAT_VERSION = 3  # 2: adds mean_abs; 3: adds tile_range_ratio

Combo = tuple[int, int, int]  # (wl_weight, subArray, cellBit)


def combo_key(wl_weight: int, subArray: int, cellBit: int) -> str:
    """The key of one combination in the statistics file, e.g. ``w8_s128_c1``."""
    return f"w{int(wl_weight)}_s{int(subArray)}_c{int(cellBit)}"


def parse_combo_key(key: str) -> Combo:
    """``w8_s128_c1`` -> (8, 128, 1)."""
    try:
        w, s, c = key.split("_")
        if not (w[0] == "w" and s[0] == "s" and c[0] == "c"):
            raise ValueError
        return int(w[1:]), int(s[1:]), int(c[1:])
    except (ValueError, IndexError):
        raise UserError(f"not a statistics combination key: {key!r} (expected like 'w8_s128_c1')") from None


def check_combo(wl_weight: int, subArray: int, cellBit: int) -> Combo:
    """Validate one combination with the same rules as a hardware point (raises ConfigError)."""
    HWConfig(wl_weight=int(wl_weight), subArray=int(subArray), cellBit=int(cellBit))
    return int(wl_weight), int(subArray), int(cellBit)


def combos_of_points(points: Iterable[HWConfig]) -> list[Combo]:
    """The distinct (wl_weight, subArray, cellBit) of some hardware points, in first-seen order."""
    return list(dict.fromkeys((p.wl_weight, p.subArray, p.cellBit) for p in points))


def combos_of_spaces(spaces: Iterable[SearchSpace]) -> list[Combo]:
    """The distinct (wl_weight, subArray, cellBit) of one or more search spaces (their full grids)."""
    found: dict[Combo, None] = {}
    for space in spaces:
        for w in space.choices["wl_weight"]:
            for s in space.choices["subArray"]:
                for c in space.choices["cellBit"]:
                    found[check_combo(w, s, c)] = None
    return list(found)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The mapped weight as W [out, fan_in] in float32 on the CPU, fan-in flattened as PyTorch does.

    transformers' ``Conv1D`` stores its weight as [in, out], so it is transposed.
    """
    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D" and not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        weight = weight.t()
    return weight.reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float32)


def _rows_per_tile(fan_in: int, rows: int, count_padding: bool) -> torch.Tensor:
    """The cell count each tile row is averaged over: S everywhere, or the real rows only."""
    tiles = num_tiles(fan_in, rows)
    counts = torch.full((tiles,), float(rows), dtype=torch.float64)
    if not count_padding:
        counts[-1] = fan_in - (tiles - 1) * rows
    return counts


# ----------------------------------------------------------------------------------------------------
# One layer, one combination: the direct definition (also the reference the one-pass code is tested on)
# ----------------------------------------------------------------------------------------------------


def layer_statistics(weight: torch.Tensor, wl_weight: int, subArray: int, cellBit: int,
                     count_padding: bool = False) -> dict[str, Any]:
    """Bit statistics of one weight tensor (any shape, output channels first) for one combination.

    Returns a dict with per-slice lists ``var``, ``density``, ``mean_sq``, ``mean_abs`` (slice 0 least
    significant)
    and ``tiles`` (T), ``fan_in``, ``out_features``, ``weight_var`` (sigma_w^2), ``wl_weight``,
    ``subArray``, ``cellBit``, ``num_slices``, ``count_padding``.
    """
    check_combo(wl_weight, subArray, cellBit)
    matrix = weight.detach().reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float32)
    out_features, fan_in = matrix.shape
    q, _ = quantize_weight_tiles(tile_columns(matrix, subArray), wl_weight)  # [out, T, S]
    slices = slice_magnitude(q, wl_weight, cellBit).double()  # [K, out, T, S]
    counts = _rows_per_tile(fan_in, subArray, count_padding)  # [T]
    # Padding cells are zero, so sums over all S cells equal sums over the real rows; only the
    # divisor decides whether they count.
    mean = slices.sum(-1) / counts
    mean_sq = (slices**2).sum(-1) / counts
    mean_abs = slices.abs().sum(-1) / counts
    nonzero = (slices != 0).double().sum(-1) / counts
    var = (mean_sq - mean**2).clamp_min(0.0)  # population variance of each tile row
    return {
        "wl_weight": int(wl_weight),
        "subArray": int(subArray),
        "cellBit": int(cellBit),
        "num_slices": int(slices.shape[0]),
        "count_padding": bool(count_padding),
        "var": var.mean(dim=(1, 2)).tolist(),
        "density": nonzero.mean(dim=(1, 2)).tolist(),
        "mean_sq": mean_sq.mean(dim=(1, 2)).tolist(),
        "mean_abs": mean_abs.mean(dim=(1, 2)).tolist(),
        "tiles": int(q.shape[1]),
        "fan_in": int(fan_in),
        "out_features": int(out_features),
        "weight_var": float(matrix.double().var(unbiased=False)),
    }


# ----------------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------------


@dataclass
class ComboStats:
    """Statistics of every mapped layer for one (wl_weight, subArray, cellBit) combination.

    Arrays are indexed [layer, slice] (or [layer]); slice 0 is the least significant.
    """

    wl_weight: int
    subArray: int
    cellBit: int
    layers: tuple[str, ...]
    var: np.ndarray  # [L, K]
    density: np.ndarray  # [L, K]
    mean_sq: np.ndarray  # [L, K]
    tiles: np.ndarray  # [L] int
    fan_in: np.ndarray  # [L] int
    weight_var: np.ndarray  # [L]
    mean_abs: np.ndarray | None = None  # [L, K]; None in files of format version 1
    tile_range_ratio: np.ndarray | None = None  # [L, K]; None in files before format version 3

    @property
    def key(self) -> str:
        return combo_key(self.wl_weight, self.subArray, self.cellBit)

    @property
    def num_slices(self) -> int:
        return int(self.var.shape[1])

    def model_average(self) -> dict[str, np.ndarray | float]:
        """Model-level statistics: the plain mean over layers of every statistic (the published form).

        ``tiles`` is the mean T, used as k_T of the model-level ADC term.
        """
        return {
            "var": self.var.mean(axis=0),
            "density": self.density.mean(axis=0),
            "mean_sq": self.mean_sq.mean(axis=0),
            "mean_abs": None if self.mean_abs is None else self.mean_abs.mean(axis=0),
            "tile_range_ratio": None if self.tile_range_ratio is None else self.tile_range_ratio.mean(axis=0),
            "tiles": float(self.tiles.mean()),
            "fan_in": float(self.fan_in.mean()),
            "weight_var": float(self.weight_var.mean()),
        }

    def layer(self, name: str) -> dict[str, Any]:
        """One layer's statistics as a dict (as `layer_statistics` returns them)."""
        if name not in self.layers:
            raise KeyError(f"layer {name!r} not in the statistics; layers: {', '.join(self.layers)}")
        i = self.layers.index(name)
        return {
            "wl_weight": self.wl_weight, "subArray": self.subArray, "cellBit": self.cellBit,
            "num_slices": self.num_slices, "var": self.var[i].tolist(), "density": self.density[i].tolist(),
            "mean_sq": self.mean_sq[i].tolist(),
            "mean_abs": None if self.mean_abs is None else self.mean_abs[i].tolist(),
            "tiles": int(self.tiles[i]), "fan_in": int(self.fan_in[i]),
            "weight_var": float(self.weight_var[i]),
        }


@dataclass
class ModelStats:
    """Bit statistics of one model for several combinations, plus what they were computed from."""

    meta: dict[str, Any]
    combos: dict[str, ComboStats] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.meta.get("layers", ()))

    def get(self, wl_weight: int, subArray: int, cellBit: int) -> ComboStats:
        """The statistics of one combination; a clear error says how to make missing ones."""
        key = combo_key(wl_weight, subArray, cellBit)
        if key not in self.combos:
            have = ", ".join(sorted(self.combos)) or "none"
            model, dataset = self.meta.get("model", "MODEL"), self.meta.get("dataset", "DATASET")
            raise KeyError(
                f"no bit statistics for {key} (wl_weight={wl_weight}, subArray={subArray}, "
                f"cellBit={cellBit}); available: {have}. Compute them with: python stat.py --model_name "
                f"{model} --dataset {dataset} --wl_weight {wl_weight} --subArray {subArray} --cellbit "
                f"{cellBit} (or --HWdes <the INI files>)")
        return self.combos[key]

    def for_point(self, point: HWConfig) -> ComboStats:
        return self.get(point.wl_weight, point.subArray, point.cellBit)

    def __contains__(self, key: object) -> bool:
        return key in self.combos


# ----------------------------------------------------------------------------------------------------
# One pass over a model
# ----------------------------------------------------------------------------------------------------


def _level_table(wl_weight: int, cellBit: int) -> torch.Tensor:
    """[2L+1, 4K] float32: for every integer level q = -L..L the values s_k(q), s_k(q)^2, [s_k(q) != 0],
    |s_k(q)|.

    float32 is exact here: every entry and every histogram-weighted sum is an integer below 2^24.
    """
    levels = max_level(wl_weight)
    q = torch.arange(-levels, levels + 1, dtype=torch.float32)
    s = slice_magnitude(q, wl_weight, cellBit).t()  # [2L+1, K]; the simulator's own slicing code
    return torch.cat([s, s**2, (s != 0).float(), s.abs()], dim=1)


def _row_stat_sums(sums: torch.Tensor, counts: torch.Tensor, num_slices: int) -> torch.Tensor:
    """[4, K] float64: per-tile-row var, density, mean_sq and mean_abs, summed over the tile rows.

    sums [out, T, 4K]: per tile row the sums of s_k, s_k^2, [s_k != 0] and |s_k|; counts [T]: the
    cells a tile row is averaged over.
    """
    means = sums.double() / counts[None, :, None]
    mean, mean_sq, nonzero, mean_abs = means.split(num_slices, dim=-1)
    var = (mean_sq - mean**2).clamp_min(0.0)  # population variance of each tile row
    return torch.stack([var.sum(dim=(0, 1)), nonzero.sum(dim=(0, 1)), mean_sq.sum(dim=(0, 1)),
                        mean_abs.sum(dim=(0, 1))])


# Output channels are processed in chunks of about this many weights, which bounds the memory of the
# per-tile-row histograms for very large layers (LLMs). Every statistic is per tile row, and a tile row
# belongs to one output channel, so chunking changes nothing in the result. (Small, cache-sized chunks
# were measured slower on CPU: per-operation overhead dominates.)
CHUNK_CELLS = 1 << 24


def _layer_all_combos(matrix: torch.Tensor, wanted: dict[int, dict[int, list[int]]],
                      count_padding: bool, chunk_cells: int | None = None) -> dict[Combo, dict[str, Any]]:
    """All requested combinations of one layer. wanted: subArray -> wl_weight -> [cellBit].

    Per (subArray, wl_weight) this is a handful of passes over the weights: divide, round, shift to a
    per-tile-row bin index, count (one histogram of levels per tile row). The quantization repeats
    `quant.quantize_weight_tiles` operation for operation (same float32 division by the same scale),
    so the levels are bit-identical to the simulator's; its clamp is a no-op since |w| <= max|w| of
    the tile row. Every cellBit then comes from the same histogram in one small matrix product.
    """
    out_features, fan_in = matrix.shape
    tables = {(bits, cell_bits): _level_table(bits, cell_bits)
              for by_bits in wanted.values() for bits, cells in by_bits.items() for cell_bits in cells}
    totals: dict[Combo, torch.Tensor] = {}
    column_max: dict[Combo, torch.Tensor] = {}  # [T, K]: max over channels of sum_rows |s_k| per tile
    chunk = max(1, (chunk_cells or CHUNK_CELLS) // fan_in)  # output channels per chunk
    for first in range(0, out_features, chunk):
        part = matrix[first:first + chunk]
        n_out = part.shape[0]
        for rows, by_bits in wanted.items():
            tiled = tile_columns(part, rows)  # once per subArray
            tiles = tiled.shape[1]
            counts = _rows_per_tile(fan_in, rows, count_padding)
            max_abs = tiled.abs().amax(dim=-1)  # once per subArray
            tile_row = torch.arange(n_out * tiles, dtype=torch.int64).reshape(n_out, tiles, 1)
            for bits, cell_bits_list in by_bits.items():
                levels = max_level(bits)
                bins = 2 * levels + 1
                scale = max_abs / levels
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                level = torch.div(tiled, scale.unsqueeze(-1)).round_()
                index_dtype = torch.int32 if n_out * tiles * bins < 2**31 else torch.int64
                index = level.to(index_dtype).add_((tile_row * bins + levels).to(index_dtype))
                hist = torch.bincount(index.reshape(-1), minlength=n_out * tiles * bins).to(torch.float32)
                table = torch.cat([tables[(bits, c)] for c in cell_bits_list], dim=1)
                sums = (hist.reshape(-1, bins) @ table).reshape(n_out, tiles, -1)
                widths = [tables[(bits, c)].shape[1] for c in cell_bits_list]
                for cell_bits, piece in zip(cell_bits_list, sums.split(widths, dim=-1), strict=True):
                    partial = _row_stat_sums(piece, counts, piece.shape[-1] // 4)
                    key = (bits, rows, cell_bits)
                    totals[key] = totals[key] + partial if key in totals else partial
                    magnitude = piece[..., 3 * (piece.shape[-1] // 4):].amax(dim=0)  # [T, K]
                    column_max[key] = torch.maximum(column_max[key], magnitude) if key in column_max else magnitude
    results: dict[Combo, dict[str, Any]] = {}
    for (bits, rows, cell_bits), total in totals.items():
        tiles = num_tiles(fan_in, rows)
        var, density, mean_sq, mean_abs = (total / (out_features * tiles)).numpy()  # mean over channels, tiles
        ranges = column_max[(bits, rows, cell_bits)].double()
        rms = ranges.square().mean(dim=0).sqrt()
        ratio = torch.where(rms > 0, ranges.amax(dim=0) / rms.clamp_min(1e-300), torch.ones_like(rms)).numpy()
        results[(bits, rows, cell_bits)] = {
            "var": var, "density": density, "mean_sq": mean_sq, "mean_abs": mean_abs, "tiles": tiles,
            "tile_range_ratio": ratio,
        }
    return results


def model_statistics(model: nn.Module, combos: Iterable[Sequence[int]], exclude: Sequence[str] = (),
                     include: Sequence[str] | None = None, *, model_name: str = "", dataset: str = "",
                     count_padding: bool = False, metadata: dict[str, Any] | None = None,
                     num_threads: int | None = 1) -> ModelStats:
    """Bit statistics of every mapped layer (`nipa.hardware.mapping.select_layers`) for every combination.

    combos: (wl_weight, subArray, cellBit) triples. One pass over the layers; see the module docstring.
    num_threads: torch intra-op threads during the pass (restored afterwards; None keeps the current
    setting). One thread by default: on an idle 2-core CPU two threads gained only ~20% (ResNet-18,
    24 combinations: 1.2 s vs 1.5 s), but on an oversubscribed one they were 5-20x slower (OpenMP
    threads wait for descheduled siblings), while one thread stayed at 1.5-2.8 s.
    """
    combo_list = list(dict.fromkeys(check_combo(*c) for c in combos))
    if not combo_list:
        raise UserError("no (wl_weight, subArray, cellBit) combination requested")
    wanted: dict[int, dict[int, list[int]]] = {}
    for bits, rows, cell_bits in combo_list:
        wanted.setdefault(rows, {}).setdefault(bits, []).append(cell_bits)

    names = select_layers(model, exclude, include)
    if not names:
        raise UserError("no mapped layer left after --exclude_layer/--include_layer")
    modules = dict(model.named_modules())
    start = time.perf_counter()
    per_layer: list[dict[Combo, dict[str, Any]]] = []
    fan_ins, weight_vars = [], []
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():
            for name in names:
                matrix = weight_matrix(modules[name])  # each weight read once
                fan_ins.append(matrix.shape[1])
                weight_vars.append(float(matrix.double().var(unbiased=False)))
                per_layer.append(_layer_all_combos(matrix, wanted, count_padding))
    finally:
        torch.set_num_threads(previous_threads)

    stats = ModelStats(meta={
        "format": STATS_FORMAT,
        "format_version": STATS_FORMAT_VERSION,
        "model": model_name,
        "dataset": dataset,
        "layers": list(names),
        "exclude_layer": list(exclude),
        "include_layer": None if include is None else list(include),
        "count_padding": bool(count_padding),
        "fan_in": fan_ins,
        "weight_var": weight_vars,
        "nipa_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - start, 4),
        **(metadata or {}),
    })
    for combo in combo_list:
        rows = [layer[combo] for layer in per_layer]
        stats.combos[combo_key(*combo)] = ComboStats(
            wl_weight=combo[0], subArray=combo[1], cellBit=combo[2], layers=tuple(names),
            var=np.stack([r["var"] for r in rows]),
            density=np.stack([r["density"] for r in rows]),
            mean_sq=np.stack([r["mean_sq"] for r in rows]),
            tiles=np.array([r["tiles"] for r in rows], dtype=np.int64),
            fan_in=np.array(fan_ins, dtype=np.int64),
            weight_var=np.array(weight_vars, dtype=np.float64),
            mean_abs=np.stack([r["mean_abs"] for r in rows]),
            tile_range_ratio=np.stack([r["tile_range_ratio"] for r in rows]),
        )
    return stats


# ----------------------------------------------------------------------------------------------------
# The statistics file: one JSON document per model
# ----------------------------------------------------------------------------------------------------


def _combo_to_json(combo: ComboStats) -> dict[str, Any]:
    avg = combo.model_average()
    return {
        "wl_weight": combo.wl_weight,
        "subArray": combo.subArray,
        "cellBit": combo.cellBit,
        "num_slices": combo.num_slices,
        # Per layer, in the order of meta["layers"]; per-slice lists are [layer][slice].
        "layers": {
            "var": combo.var.tolist(),
            "density": combo.density.tolist(),
            "mean_sq": combo.mean_sq.tolist(),
            **({} if combo.mean_abs is None else {"mean_abs": combo.mean_abs.tolist()}),
            **({} if combo.tile_range_ratio is None else {"tile_range_ratio": combo.tile_range_ratio.tolist()}),
            "tiles": combo.tiles.tolist(),
        },
        # Plain averages over the layers (what the published metric uses).
        "model": {key: (value.tolist() if isinstance(value, np.ndarray) else value)
                  for key, value in avg.items() if value is not None},
    }


def save_statistics(stats: ModelStats, path: str | Path) -> Path:
    """Write the statistics as one JSON file (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": stats.meta, "combinations": {k: _combo_to_json(c) for k, c in stats.combos.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_statistics(path: str | Path) -> ModelStats:
    """Read a file written by `save_statistics`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist; make it with python stat.py ...")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
        meta = document["meta"]
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {STATS_FORMAT!r}")
        if meta.get("format_version", 0) > STATS_FORMAT_VERSION:
            raise ValueError(f"format version {meta['format_version']} is newer than this nipa understands")
        layers = tuple(meta["layers"])
        fan_in = np.array(meta["fan_in"], dtype=np.int64)
        weight_var = np.array(meta["weight_var"], dtype=np.float64)
        stats = ModelStats(meta=meta)
        for key, entry in document["combinations"].items():
            per_layer = entry["layers"]
            combo = ComboStats(
                wl_weight=int(entry["wl_weight"]), subArray=int(entry["subArray"]),
                cellBit=int(entry["cellBit"]), layers=layers,
                var=np.array(per_layer["var"], dtype=np.float64).reshape(len(layers), -1),
                density=np.array(per_layer["density"], dtype=np.float64).reshape(len(layers), -1),
                mean_sq=np.array(per_layer["mean_sq"], dtype=np.float64).reshape(len(layers), -1),
                tiles=np.array(per_layer["tiles"], dtype=np.int64),
                fan_in=fan_in, weight_var=weight_var,
                mean_abs=(np.array(per_layer["mean_abs"], dtype=np.float64).reshape(len(layers), -1)
                          if "mean_abs" in per_layer else None),
                tile_range_ratio=(np.array(per_layer["tile_range_ratio"], dtype=np.float64).reshape(len(layers), -1)
                                  if "tile_range_ratio" in per_layer else None),
            )
            if combo.key != key:
                raise ValueError(f"combination {key!r} holds statistics of {combo.key}")
            stats.combos[key] = combo
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a valid nipa statistics file ({exc}); make it again with stat.py") from exc
    return stats


def expected_num_slices(wl_weight: int, cellBit: int) -> int:
    """K = ceil((b - 1) / c)."""
    return math.ceil((wl_weight - 1) / cellBit)


def check_stats_weights(stats: ModelStats, weights: str | None, path: str | Path,
                        log: Callable[[str], None] = print) -> None:
    """Refuse statistics of other weights than `weights` (sha256 from nipa.workloads.zoo.weights_sha256). Statistics
    or records that do not say which weights they came from (older files) pass with a note."""
    have = stats.meta.get("weights_sha256")
    if weights is None or have is None:
        log(f"note: cannot check that {path} holds statistics of the same weights (no weights_sha256 "
            f"{'in the statistics' if have is None else 'in the records'}); make them again with stat.py to "
            "be sure")
        return
    if have != weights:
        raise UserError(f"{path} holds statistics of other weights (sha256 {have[:12]}, from "
                        f"{stats.meta.get('source')}) than the records' (sha256 {weights[:12]}); make them "
                        "for the records' checkpoint with stat.py --ckpt <that checkpoint>")
