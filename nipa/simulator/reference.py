"""Two deliberately simple crossbar simulators, the benchmark baselines of `nipa.simulator.crossbar` (and a
cross-check in the tests; the independent oracle is tests/helpers/oracle.py).

The naive loop loops in Python over input bits z, weight slices k and tiles t, and runs one small
product per (z, k, t) (SPEC section 4, step 6); the original's structure runs one product over all
tiles per (z, k), as the original tool did:

    P = x_z[:, tile t] @ G_diff[k, :, tile t].T                       # [n, out]
    y += 2^z * 2^(c k) * scale_w[:, t] * ADC(P)

then multiplies by the input scale. The cells are the ones already programmed on the fast
`CrossbarCore` (its `conductance` buffer), so device errors are identical; only the arithmetic is
organised differently: weight quantization, slicing and cell programming are done once, at
conversion, as in the fast simulator, so the baseline times the forward arithmetic only. Per-read
device noise is not supported (the fast simulator draws it in a batched
order that a loop cannot follow draw for draw).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nipa.hardware.config import HWConfig
from nipa.hardware.quant import input_bit_planes, quantize_input
from nipa.simulator.crossbar import (
    DEFAULT_MEMORY_MB,
    CrossbarConv2d,
    CrossbarCore,
    CrossbarLinear,
    convert,
    crossbar_cores,
)


def pair_conductances(core: CrossbarCore) -> torch.Tensor:
    """The programmed differential reads G_pos - G_neg of a core as [K, out, T, rows]."""
    t, rows, _ = core.conductance.shape
    return core.conductance.reshape(t, rows, core.num_slices, core.out_features).permute(2, 3, 0, 1)


def naive_range(partials: list[torch.Tensor], core: CrossbarCore, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ADC range (lo, hi) of each tile's read P [n, out] of one input bit and slice `k`:
    dynamic, one range over every tile, batch row and column of the layer; dynamic_tile, the range of
    each tile's read over its batch rows and columns; calibrated, the core's measured per-slice range;
    full, the physical full scale +-S (2^c - 1) of a column of S = subArray rows."""
    hw = core.hw
    if hw.adc_mode == "dynamic":
        lo = torch.stack([p.min() for p in partials]).min()
        hi = torch.stack([p.max() for p in partials]).max()
        return [(lo, hi)] * len(partials)
    if hw.adc_mode == "dynamic_tile":
        return [(p.min(), p.max()) for p in partials]
    if hw.adc_mode == "calibrated":
        return [(core.adc_range[k, 0], core.adc_range[k, 1])] * len(partials)
    full = float(hw.subArray * (2**hw.cellBit - 1))
    return [(partials[0].new_tensor(-full), partials[0].new_tensor(full))] * len(partials)


def naive_adc(partial: torch.Tensor, core: CrossbarCore, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quantize one read P [n, out] in the range (lo, hi). The rounding itself is the core's `adc` (the
    rule lo + step * clamp(round((P - lo) / step), 0, 2^a_r), step = (hi - lo) / 2^a_r), so that both
    simulators break exact ties the same way; the independent float64 oracle in tests/helpers checks
    the rule itself."""
    return core.adc(partial, lo, hi)


def _padded_bit_planes(core: CrossbarCore, x: torch.Tensor,
                       scale_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input's bit planes [Z, n, T * rows] (the last tile zero padded) and its per-tensor scale."""
    x_q, scale_in = quantize_input(x if not x.is_floating_point() else x.float(), core.hw.wl_input, scale_in)
    planes = input_bit_planes(x_q, core.hw.wl_input)  # [Z, n, fan_in]
    pad = core.num_tiles * core.rows - core.fan_in
    if pad:
        planes = torch.nn.functional.pad(planes, (0, pad))
    return planes, scale_in


@torch.no_grad()
def naive_core_forward(
    core: CrossbarCore, x: torch.Tensor, scale_in: torch.Tensor | None = None
) -> torch.Tensor:
    """x [n, fan_in] -> y [n, out] (no bias), computed one (tile, bit, slice) product at a time.
    `scale_in` is the per-tensor input scale (computed from x when not given), as in the fast core.

    While `core.calibrating` is set (inside `calibrate_adc`) the reads pass unquantized and the
    per-slice range is recorded in `core.adc_range`, as the fast core does.
    """
    hw = core.hw
    if core.per_read:
        raise NotImplementedError("the naive reference supports per-chip device error only")
    if hw.adc_mode == "calibrated" and not (core.calibrated or core.calibrating):
        raise RuntimeError(f"layer {core.name}: ADC mode 'calibrated' needs calibrate_adc first")
    planes, scale_in = _padded_bit_planes(core, x, scale_in)  # [Z, n, T * rows]; x may be levels
    pairs = pair_conductances(core)  # [K, out, T, rows]
    y = torch.zeros(x.shape[0], core.out_features, dtype=torch.float32, device=x.device)
    for z in range(hw.wl_input - 1):
        for k in range(core.num_slices):
            partials = [planes[z, :, t * core.rows:(t + 1) * core.rows] @ pairs[k, :, t, :].T
                        for t in range(core.num_tiles)]  # each [n, out]
            if core.calibrating:
                for partial in partials:
                    core.adc_range[k, 0] = torch.fmin(core.adc_range[k, 0], partial.min())
                    core.adc_range[k, 1] = torch.fmax(core.adc_range[k, 1], partial.max())
                reads = partials
            else:
                reads = [naive_adc(p, core, lo, hi) for p, (lo, hi) in zip(partials, naive_range(partials, core, k),
                                                                            strict=True)]
            for t, read in enumerate(reads):
                y += (2.0**z * 2.0 ** (hw.cellBit * k)) * read * core.weight_scale[:, t]
    return y * scale_in


@torch.no_grad()
def original_structure_forward(
    core: CrossbarCore, x: torch.Tensor, scale_in: torch.Tensor | None = None
) -> torch.Tensor:
    """The original tool's structure, the second benchmark baseline: one batched product over all tiles
    per (input bit, slice), then the ADC over that product and the shift and add (dynamic ADC mode and
    per-chip cells only)."""
    hw = core.hw
    if core.per_read or hw.adc_mode != "dynamic":
        raise NotImplementedError("the original's structure is timed in dynamic ADC mode with per-chip cells")
    planes, scale_in = _padded_bit_planes(core, x, scale_in)  # [Z, n, T * rows]; x may be levels
    n = x.shape[0]
    tiled = planes.view(planes.shape[0], n, core.num_tiles, core.rows).permute(0, 2, 1, 3)  # [Z, T, n, S]
    pairs = pair_conductances(core)  # [K, out, T, rows]
    y = torch.zeros(n, core.out_features, dtype=torch.float32, device=x.device)
    for z in range(hw.wl_input - 1):
        for k in range(core.num_slices):
            partial = torch.bmm(tiled[z], pairs[k].permute(1, 2, 0))  # [T, n, out]
            read = core.adc(partial, partial.min(), partial.max())
            y += (2.0**z * 2.0 ** (hw.cellBit * k)) * torch.einsum("tno,ot->no", read, core.weight_scale)
    return y * scale_in


class NaiveCrossbarCore(CrossbarCore):
    """A `CrossbarCore` whose forward is the naive loop; everything else (quantization, slices,
    programming, calibration state) is inherited unchanged."""

    def forward(self, x: torch.Tensor, scale_in: torch.Tensor | None = None) -> torch.Tensor:
        return naive_core_forward(self, x, scale_in)


class OriginalStructureCore(CrossbarCore):
    """A `CrossbarCore` whose forward is the original tool's structure (one product per bit and slice)."""

    def forward(self, x: torch.Tensor, scale_in: torch.Tensor | None = None) -> torch.Tensor:
        return original_structure_forward(self, x, scale_in)


def naive_convert(
    model: nn.Module,
    hw: HWConfig,
    *,
    exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
    seed: int = 0,
    chip: int = 0,
    per_read: bool = False,
    memory_mb: float = DEFAULT_MEMORY_MB,
    structure: str = "naive",
) -> nn.Module:
    """Like `nipa.simulator.crossbar.convert` (same layers, same chip), but every core runs the naive loop
    (`structure="naive"`: one product per tile, bit and slice) or the original's structure
    (`"original"`: one product over all tiles per bit and slice)."""
    if per_read:
        raise NotImplementedError("the naive reference supports per-chip device error only (per_read=False)")
    converted = convert(model, hw, exclude=exclude, include=include, seed=seed, chip=chip,
                        per_read=False, memory_mb=memory_mb)
    for core in crossbar_cores(converted):
        # Same object and buffers, naive forward: the programmed cells are shared, not re-drawn.
        core.__class__ = OriginalStructureCore if structure == "original" else NaiveCrossbarCore
    return converted


@torch.no_grad()
def compare_layerwise(reference: nn.Module, other: nn.Module, inputs) -> dict[str, float]:
    """Run `reference` on `inputs`, record every crossbar layer's input and output, feed the same input
    to the layer of the same name in `other`: max |other - reference| / max |reference| per layer.

    Comparing layer by layer isolates each layer: end to end, a float-rounding difference in one layer's
    output can flip the next layer's input quantization (a rounding boundary of its own) and grow."""
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(name: str):
        return lambda _module, args, out: records.__setitem__(name, (args[0], out))

    hooks = [module.register_forward_hook(recorder(name)) for name, module in reference.named_modules()
             if isinstance(module, (CrossbarLinear, CrossbarConv2d))]
    try:
        reference(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    others = dict(other.named_modules())
    missing = sorted(set(records) - set(others))
    if missing:
        raise ValueError(f"layers {missing} of the reference model are missing from the other model")
    return {
        name: ((others[name](x) - y).abs().max() / y.abs().max()).item() for name, (x, y) in records.items()
    }
