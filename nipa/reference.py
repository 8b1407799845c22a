"""A deliberately naive crossbar simulator in the original tool's structure: the test oracle and the
benchmark baseline of `nipa.crossbar`.

For each mapped layer it loops in Python over tiles t, input bits z and weight slices k, and runs one
small product per (t, z, k) (SPEC section 4, step 6):

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

from nipa.config import HWConfig
from nipa.crossbar import (
    DEFAULT_MEMORY_MB,
    CrossbarConv2d,
    CrossbarCore,
    CrossbarLinear,
    convert,
    crossbar_cores,
)
from nipa.quant import input_bit_planes, quantize_input


def pair_conductances(core: CrossbarCore) -> torch.Tensor:
    """The programmed differential reads G_pos - G_neg of a core as [K, out, T, rows]."""
    t, rows, _ = core.conductance.shape
    return core.conductance.reshape(t, rows, core.num_slices, core.out_features).permute(2, 3, 0, 1)


def naive_range(partial: torch.Tensor, core: CrossbarCore, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ADC range (lo, hi) of one read P [n, out] of slice `k`: dynamic, the range of this read
    over the batch rows and columns; calibrated, the core's measured per-slice range; full, the
    physical full scale +-S (2^c - 1) of a column of S = subArray rows."""
    hw = core.hw
    if hw.adc_mode == "dynamic":
        return partial.min(), partial.max()
    if hw.adc_mode == "calibrated":
        return core.adc_range[k, 0], core.adc_range[k, 1]
    full = float(hw.subArray * (2**hw.cellBit - 1))
    return partial.new_tensor(-full), partial.new_tensor(full)


def naive_adc(partial: torch.Tensor, core: CrossbarCore, k: int) -> torch.Tensor:
    """Quantize one read P [n, out] of slice `k`. The rounding itself is the core's `adc` (the rule
    lo + step * clamp(round((P - lo) / step), 0, 2^a_r), step = (hi - lo) / 2^a_r), so that both
    simulators break exact ties the same way; `adc` is tested on its own in tests/test_crossbar.py."""
    lo, hi = naive_range(partial, core, k)
    return core.adc(partial, lo, hi)


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
    x = x.float()
    x_q, scale_in = quantize_input(x, hw.wl_input, scale_in)
    planes = input_bit_planes(x_q, hw.wl_input)  # [Z, n, fan_in]
    pad = core.num_tiles * core.rows - core.fan_in
    if pad:
        planes = torch.nn.functional.pad(planes, (0, pad))
    pairs = pair_conductances(core)  # [K, out, T, rows]
    y = x.new_zeros(x.shape[0], core.out_features)
    for t in range(core.num_tiles):
        rows = slice(t * core.rows, (t + 1) * core.rows)
        for z in range(hw.wl_input - 1):
            x_z = planes[z, :, rows]
            for k in range(core.num_slices):
                partial = x_z @ pairs[k, :, t, :].T  # [n, out]
                if core.calibrating:
                    lo, hi = core.adc_range[k, 0], core.adc_range[k, 1]
                    core.adc_range[k, 0] = torch.fmin(lo, partial.min())
                    core.adc_range[k, 1] = torch.fmax(hi, partial.max())
                    read = partial
                else:
                    read = naive_adc(partial, core, k)
                y += (2.0**z * 2.0 ** (hw.cellBit * k)) * read * core.weight_scale[:, t]
    return y * scale_in


class NaiveCrossbarCore(CrossbarCore):
    """A `CrossbarCore` whose forward is the naive loop; everything else (quantization, slices,
    programming, calibration state) is inherited unchanged."""

    def forward(self, x: torch.Tensor, scale_in: torch.Tensor | None = None) -> torch.Tensor:
        return naive_core_forward(self, x, scale_in)


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
) -> nn.Module:
    """Like `nipa.crossbar.convert` (same layers, same chip), but every core runs the naive loop."""
    if per_read:
        raise NotImplementedError("the naive reference supports per-chip device error only (per_read=False)")
    converted = convert(model, hw, exclude=exclude, include=include, seed=seed, chip=chip,
                        per_read=False, memory_mb=memory_mb)
    for core in crossbar_cores(converted):
        # Same object and buffers, naive forward: the programmed cells are shared, not re-drawn.
        core.__class__ = NaiveCrossbarCore
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
