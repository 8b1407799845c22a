"""A hardware cost model: area, energy per inference and latency per inference of a model's mapped layers
on an RRAM crossbar accelerator at one hardware point. Documented assumptions, not a circuit simulator.

Mapping (the simulator's, SPEC section 4). A mapped layer with fan-in F, out features O, evaluated at P
output positions per inference (a convolution's output pixels, a language model's tokens, 1 for a
classifier's Linear) on a point with subArray S rows, K = ceil((wl_weight - 1) / cellBit) slices and
crossbar arrays of C physical columns:

- tiles T = ceil(F / S); every weight slice takes a differential pair of columns, so a layer needs
  2 O K columns per tile, in G = ceil(2 O K / C) column groups: T G arrays of S x C cells, every weight
  resident (no reprogramming, as in ISAAC). Cells holding weights: 2 O K F (the rest of the arrays is
  padding);
- one inference feeds each input bit-serially: wl_input - 1 input cycles (magnitude bits, the sign is
  applied digitally, as the simulator does);
- the ADC reads the current difference of a column pair (as the simulator quantizes
  P = sum x (G_pos - G_neg)): conversions = T x (wl_input - 1) x K x P x O;
- an array has C / 2 column pairs and ceil(C / 2 / ADC_share) ADCs, each multiplexed over ADC_share
  pairs (an ADC serves one array: a share above C / 2 means one ADC per array);
- row drivers (1-bit DACs): every real row of every array is driven in every input cycle:
  driver activations = G x F x (wl_input - 1) x P x `input_activity`;
- latency: the arrays of a layer work in parallel, its output positions one after another, and the
  layers one after another (one inference's latency; ISAAC pipelines layers for throughput, which does
  not shorten one inference). One input cycle takes max(crossbar read, conversions per ADC / ADC rate)
  with conversions per ADC = min(ADC_share, pairs in a column group):
  latency = sum_layers P x (wl_input - 1) x cycle time.

Coefficients (`CostCoefficients`, every one overridable in the INI's [Cost] section; 32 nm):

- ISAAC (A. Shafiee et al., "ISAAC: A Convolutional Neural Network Accelerator with In-Situ Analog
  Arithmetic in Crossbars", ISCA 2016), Table 6: per IMA 8 ADCs of 8 bits at 1.28 GS/s, 16 mW and
  0.0096 mm^2 in all; 8 x 128 1-bit DACs, 4 mW, 0.00017 mm^2; 8 x 128 sample-and-holds, 10 uW,
  0.00004 mm^2; 8 crossbars of 128 x 128 2-bit cells, 2.4 mW, 0.0002 mm^2; 4 shift-and-add units,
  0.2 mW, 0.00024 mm^2; a 2 KB input register, 1.24 mW, 0.0021 mm^2; a 256 B output register,
  0.23 mW, 0.00077 mm^2. Per tile (12 IMAs, 96 crossbars): 64 KB eDRAM buffer, 20.7 mW, 0.083 mm^2;
  bus 7 mW, 0.090 mm^2; router 42 mW and 0.151 mm^2 shared by 4 tiles; sigmoid 0.52 mW, 0.0006 mm^2;
  max-pool 0.4 mW, 0.00024 mm^2; tile shift-and-add 0.05 mW, 0.00006 mm^2; tile output register 1.68 mW,
  0.0032 mm^2; tile total 330 mW and 0.372 mm^2, of which the ADCs are 58% of the power and 31% of the
  area (the paper's figures). The crossbar read cycle is 100 ns (128 conversions at 1.28 GS/s).
  Energies per event are those powers divided by ISAAC's event rate at full activity (e.g. an ADC
  conversion 2 mW / 1.28 GS/s = 1.5625 pJ; a row driver 4 mW / 1024 x 100 ns = 0.39 pJ per input
  cycle; a cell read 0.3 mW per 16,384-cell crossbar x 100 ns = 1.83 fJ); areas per unit are the
  component areas divided by their counts; tile-level buffers and periphery are shared out per crossbar
  (1/96 of a tile each) and charged per driven row (their event rate in ISAAC is the row rate).
- ADC resolution scaling: B. Murmann, "ADC Performance Survey 1997-2024" (Stanford): above a few bits a
  SAR ADC's energy per conversion follows a roughly constant Walden figure of merit E / 2^ENOB, i.e.
  about doubles per bit, while at low resolution fixed comparator and logic energy dominates. Modelled as
  E(b) = E_ref (2^b + 2^knee) / (2^b_ref + 2^knee) with knee = 4 bits (so E doubles per bit well above 4
  bits and levels off below); ISAAC's 8-bit ADC gives E_ref / 2^8 = 6.1 fJ per conversion step, within
  the survey's range for GS/s-class SAR designs. The area follows the same form (a SAR's capacitive DAC
  grows as 2^b unit capacitors above a fixed comparator and logic area). Assumption (no source): a SAR
  resolves one bit per clock, so its rate scales as (b_ref + 1) / (b + 1).
- ADC sharing: NeuroSim (X. Peng, S. Yu et al., DNN+NeuroSim manual) multiplexes one ADC over several
  columns (its default: 8 columns per ADC), which trades ADC area and leakage for read latency; the same
  trade is `ADC_share` here. MNSIM 2.0 (Z. Zhu et al., GLSVLSI 2020) models cost hierarchically
  (crossbar, processing element, tile) as done here; no MNSIM number is used.

Not modelled: digital layers (pooling, activations, normalization, layers kept digital), off-chip memory,
static leakage, weight programming, inter-tile communication beyond ISAAC's per-tile bus and router share,
and any dependence of the cell read energy on the stored levels or cellBit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# ISAAC's event rates, the denominators of its per-event energies (Table 6 at full activity).
_ISAAC_CYCLE_S = 100e-9  # one crossbar read (one input bit)
_ISAAC_ROWS_PER_IMA = 8 * 128  # rows driven per cycle in one IMA
_ISAAC_ADC_RATE = 1.28e9  # conversions per second per ADC
_ISAAC_ADCS_PER_IMA = 8
_ISAAC_CROSSBARS_PER_IMA = 8
_ISAAC_CROSSBARS_PER_TILE = 96
_ISAAC_CELLS_PER_CROSSBAR = 128 * 128
_PJ = 1e12  # joules -> picojoules
_UM2 = 1e6  # mm^2 -> um^2

# Tile-level components other than the eDRAM (bus, router share, sigmoid, max-pool, tile S+A and
# output register), ISAAC Table 6: power in W and area in mm^2 per tile.
_ISAAC_TILE_PERIPHERY_W = 7e-3 + 42e-3 / 4 + 0.52e-3 + 0.4e-3 + 0.05e-3 + 1.68e-3
_ISAAC_TILE_PERIPHERY_MM2 = 0.090 + 0.151 / 4 + 0.0006 + 0.00024 + 0.00006 + 0.0032
_ISAAC_TILE_ROW_RATE = _ISAAC_CROSSBARS_PER_TILE * 128 / _ISAAC_CYCLE_S  # driven rows per second per tile


@dataclass(frozen=True)
class CostCoefficients:
    """Per-event energies (pJ), per-unit areas (um^2) and timings; defaults from ISAAC (module docstring).
    Every field can be set in the INI's [Cost] section."""

    adc_energy_pj: float = 16e-3 / _ISAAC_ADCS_PER_IMA / _ISAAC_ADC_RATE * _PJ  # per conversion at adc_ref_bits
    adc_area_um2: float = 0.0096 / _ISAAC_ADCS_PER_IMA * _UM2  # per ADC at adc_ref_bits
    adc_rate_gsps: float = _ISAAC_ADC_RATE / 1e9  # GS/s (= conversions per ns) at adc_ref_bits
    adc_ref_bits: float = 8.0
    adc_energy_knee_bits: float = 4.0  # below it the energy per conversion levels off (Murmann's survey)
    adc_area_knee_bits: float = 4.0
    dac_energy_pj: float = 4e-3 / _ISAAC_ROWS_PER_IMA * _ISAAC_CYCLE_S * _PJ  # per driven row and cycle
    dac_area_um2: float = 0.00017 / _ISAAC_ROWS_PER_IMA * _UM2  # per row driver
    sample_hold_energy_pj: float = 10e-6 / _ISAAC_ROWS_PER_IMA * _ISAAC_CYCLE_S * _PJ  # per conversion
    sample_hold_area_um2: float = 0.00004 / _ISAAC_ROWS_PER_IMA * _UM2  # per column pair
    cell_read_energy_pj: float = (2.4e-3 / _ISAAC_CROSSBARS_PER_IMA * _ISAAC_CYCLE_S
                                  / _ISAAC_CELLS_PER_CROSSBAR * _PJ)  # per weight cell and cycle
    cell_area_um2: float = 0.0002 / _ISAAC_CROSSBARS_PER_IMA / _ISAAC_CELLS_PER_CROSSBAR * _UM2
    shift_add_energy_pj: float = 0.2e-3 / (_ISAAC_ADCS_PER_IMA * _ISAAC_ADC_RATE) * _PJ  # per conversion
    shift_add_area_um2: float = 0.00024 / _ISAAC_ADCS_PER_IMA * _UM2  # per ADC (ISAAC: 1 unit per 2 ADCs)
    input_register_energy_pj: float = 1.24e-3 / _ISAAC_ROWS_PER_IMA * _ISAAC_CYCLE_S * _PJ  # per driven row
    input_register_area_um2: float = 0.0021 / _ISAAC_CROSSBARS_PER_IMA * _UM2  # per array
    output_register_energy_pj: float = 0.23e-3 / (_ISAAC_ADCS_PER_IMA * _ISAAC_ADC_RATE) * _PJ  # per conversion
    output_register_area_um2: float = 0.00077 / _ISAAC_CROSSBARS_PER_IMA * _UM2  # per array
    buffer_energy_pj: float = 20.7e-3 / _ISAAC_TILE_ROW_RATE * _PJ  # eDRAM, per driven row
    buffer_area_um2: float = 0.083 / _ISAAC_CROSSBARS_PER_TILE * _UM2  # eDRAM share per array
    periphery_energy_pj: float = _ISAAC_TILE_PERIPHERY_W / _ISAAC_TILE_ROW_RATE * _PJ  # per driven row
    periphery_area_um2: float = _ISAAC_TILE_PERIPHERY_MM2 / _ISAAC_CROSSBARS_PER_TILE * _UM2  # per array
    xbar_read_ns: float = _ISAAC_CYCLE_S * 1e9  # shortest input cycle (crossbar read, sample and hold)
    input_activity: float = 1.0  # share of row drivers active per cycle (ISAAC's powers are at 1)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, float] | None = None) -> CostCoefficients:
        """The defaults with some fields replaced (the INI's [Cost] section, already checked by
        nipa.hardware.config); an unknown name or a non-positive value is a ValueError."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown cost coefficient(s) {unknown}; known: {', '.join(cls.names())}")
        for name, value in overrides.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"cost coefficient {name} = {value!r}: must be a positive number")
        return dataclasses.replace(cls(), **{k: float(v) for k, v in overrides.items()})

    def adc_energy(self, bits: np.ndarray | float) -> np.ndarray:
        """Energy of one conversion (pJ) at `bits` of resolution (Murmann-survey form, module docstring)."""
        return self.adc_energy_pj * _resolution_factor(bits, self.adc_ref_bits, self.adc_energy_knee_bits)

    def adc_area(self, bits: np.ndarray | float) -> np.ndarray:
        """Area of one ADC (um^2) at `bits` of resolution."""
        return self.adc_area_um2 * _resolution_factor(bits, self.adc_ref_bits, self.adc_area_knee_bits)

    def adc_rate(self, bits: np.ndarray | float) -> np.ndarray:
        """Conversions per ns of one ADC at `bits` (one bit resolved per clock, plus sampling)."""
        bits = np.asarray(bits, dtype=np.float64)
        return self.adc_rate_gsps * (self.adc_ref_bits + 1.0) / (bits + 1.0)


def _resolution_factor(bits: np.ndarray | float, ref_bits: float, knee_bits: float) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.float64)
    return (2.0**bits + 2.0**knee_bits) / (2.0**ref_bits + 2.0**knee_bits)


# ----------------------------------------------------------------------------------------------------
# Layer shapes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """What the cost of one mapped layer depends on."""

    name: str
    fan_in: int  # rows of the weight matrix (C_in k_h k_w for a convolution)
    out_features: int  # its columns (output channels)
    positions: int  # output positions per inference (output pixels of a convolution, tokens, ...)


def layer_shapes(model: nn.Module, layers: Sequence[str], example_input: Any,
                 inferences: int = 1) -> list[LayerShape]:
    """The shapes of the mapped `layers` from one forward pass of `example_input` (`inferences` images or
    token sequences, 1 by default) with hooks: positions = the layer's output elements per out feature
    and inference. The batch dimension is not read from the output, since some models (OPT's fc1/fc2)
    flatten batch and tokens into one. Conv1D of transformers (weight [in, out]) is recognised like
    everywhere else."""
    from nipa.estimation.stats import weight_matrix  # its [out, fan_in] convention is the simulator's

    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"layers not in the model: {missing}")
    outputs: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in layers:
        def hook(module, inputs, output, name=name):  # noqa: ANN001 - torch's hook signature
            outputs[name] = tuple(output.shape)
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    shapes = []
    for name in layers:
        if name not in outputs:
            raise RuntimeError(f"layer {name} was not called by the example forward pass; its positions per "
                               "inference are unknown")
        out_features, fan_in = weight_matrix(modules[name]).shape
        positions = math.prod(outputs[name]) // (inferences * out_features)
        shapes.append(LayerShape(name, int(fan_in), int(out_features), int(positions)))
    return shapes


# ----------------------------------------------------------------------------------------------------
# The model, vectorized over hardware points
# ----------------------------------------------------------------------------------------------------

# Energy and area parts, in the order the breakdowns list them.
ENERGY_PARTS = ("adc", "dac", "sample_hold", "crossbar", "shift_add", "input_register", "output_register",
                "buffer", "periphery")
AREA_PARTS = ENERGY_PARTS


def hardware_cost(shapes: Sequence[LayerShape], wl_weight: Any, wl_input: Any, subArray: Any,
                  adc_bits: Any, cellBit: Any, adc_share: Any, columns: Any,
                  coefficients: CostCoefficients | None = None, breakdown: bool = False) -> dict[str, Any]:
    """Area (mm^2), energy per inference (nJ) and latency per inference (us) of every hardware point.

    The hardware arguments are arrays [N] (or scalars) that broadcast together; any of them may also be
    [N, L], one value per point and mapped layer (in the order of `shapes`), for per-layer points
    (`layer_arrays`). Returns {"area_mm2",
    "energy_nj", "latency_us", "arrays", "adcs", "cells", "conversions", "row_activations"} as arrays
    [N]; with `breakdown` also "energy_parts_nj" and "area_parts_mm2": {part: [N]} (ENERGY_PARTS).
    """
    c = coefficients or CostCoefficients()
    if not shapes:
        raise ValueError("no mapped layer to cost")
    point = [np.asarray(x, dtype=np.float64) for x in
             (wl_weight, wl_input, subArray, adc_bits, cellBit, adc_share, columns)]
    for x in point:
        if x.ndim == 2 and x.shape[1] != len(shapes):
            raise ValueError(f"per-layer hardware values of shape {x.shape} for {len(shapes)} mapped layers")
    # [N] -> [N, 1] against layers [L]; per-layer values [N, L] stay as they are
    point = [x if x.ndim == 2 else np.atleast_1d(x)[:, None] for x in point]
    w, a_in, rows, b_adc, cell, share, cols = np.broadcast_arrays(*point)
    fan_in = np.array([s.fan_in for s in shapes], dtype=np.float64)[None, :]
    out = np.array([s.out_features for s in shapes], dtype=np.float64)[None, :]
    positions = np.array([s.positions for s in shapes], dtype=np.float64)[None, :]

    slices = np.ceil((w - 1.0) / cell)
    tiles = np.ceil(fan_in / rows)
    pairs = out * slices  # column pairs of one tile
    groups = np.ceil(2.0 * pairs / cols)
    arrays = tiles * groups
    pairs_per_array = cols / 2.0
    adcs_per_array = np.ceil(pairs_per_array / np.minimum(share, pairs_per_array))
    cycles = a_in - 1.0

    conversions = tiles * cycles * pairs * positions  # [N, L]
    row_activations = groups * fan_in * cycles * positions * c.input_activity
    cell_reads = 2.0 * pairs * fan_in * cycles * positions
    conversions_per_adc = np.minimum(share, np.minimum(pairs_per_array, pairs))
    cycle_ns = np.maximum(c.xbar_read_ns, conversions_per_adc / c.adc_rate(b_adc))
    latency_ns = (positions * cycles * cycle_ns).sum(axis=1)

    energy_pj = {
        "adc": conversions * c.adc_energy(b_adc),
        "dac": row_activations * c.dac_energy_pj,
        "sample_hold": conversions * c.sample_hold_energy_pj,
        "crossbar": cell_reads * c.cell_read_energy_pj,
        "shift_add": conversions * c.shift_add_energy_pj,
        "input_register": row_activations * c.input_register_energy_pj,
        "output_register": conversions * c.output_register_energy_pj,
        "buffer": row_activations * c.buffer_energy_pj,
        "periphery": row_activations * c.periphery_energy_pj,
    }
    adcs = arrays * adcs_per_array
    area_um2 = {
        "adc": adcs * c.adc_area(b_adc),
        "dac": arrays * rows * c.dac_area_um2,
        "sample_hold": arrays * pairs_per_array * c.sample_hold_area_um2,
        "crossbar": arrays * rows * cols * c.cell_area_um2,
        "shift_add": adcs * c.shift_add_area_um2,
        "input_register": arrays * c.input_register_area_um2,
        "output_register": arrays * c.output_register_area_um2,
        "buffer": arrays * c.buffer_area_um2,
        "periphery": arrays * c.periphery_area_um2,
    }
    energy_parts = {k: v.sum(axis=1) / 1e3 for k, v in energy_pj.items()}  # pJ -> nJ
    area_parts = {k: v.sum(axis=1) / _UM2 for k, v in area_um2.items()}  # um^2 -> mm^2
    result: dict[str, Any] = {
        "area_mm2": sum(area_parts.values()),
        "energy_nj": sum(energy_parts.values()),
        "latency_us": latency_ns / 1e3,
        "arrays": arrays.sum(axis=1),
        "adcs": adcs.sum(axis=1),
        "cells": (arrays * rows * cols).sum(axis=1),
        "weight_cells": (2.0 * pairs * fan_in).sum(axis=1),
        "conversions": conversions.sum(axis=1),
        "row_activations": row_activations.sum(axis=1),
    }
    if breakdown:
        result["energy_parts_nj"] = energy_parts
        result["area_parts_mm2"] = area_parts
    return result


LAYER_COST_FIELDS = ("wl_weight", "wl_input", "subArray", "ADCprecision", "cellBit")


def layer_arrays(shapes: Sequence[LayerShape], points: Sequence[Any]) -> dict[str, np.ndarray]:
    """{field: [N, L]} of LAYER_COST_FIELDS for hardware points (HWConfig or nipa.hardware.config.PerLayerConfig,
    whose layers take their effective points), the layers in the order of `shapes`."""
    def of_layer(point: Any, name: str) -> Any:
        return point.for_layer(name) if hasattr(point, "for_layer") else point

    return {field: np.array([[getattr(of_layer(p, s.name), field) for s in shapes] for p in points],
                            dtype=np.float64) for field in LAYER_COST_FIELDS}


def point_cost(shapes: Sequence[LayerShape], point: Any, adc_share: int, columns: int,
               coefficients: CostCoefficients | None = None) -> dict[str, Any]:
    """The cost of one hardware point (an HWConfig, or a PerLayerConfig whose layers each take their own
    effective point) as plain floats, with the breakdowns."""
    values = layer_arrays(shapes, [point])
    arrays = hardware_cost(shapes, *(values[f] for f in LAYER_COST_FIELDS), adc_share, columns, coefficients,
                           breakdown=True)
    plain: dict[str, Any] = {}
    for key, value in arrays.items():
        if isinstance(value, dict):
            plain[key] = {part: float(v[0]) for part, v in value.items()}
        else:
            plain[key] = float(value[0])
    return plain
