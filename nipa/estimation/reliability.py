"""How far to trust the fast estimate at a hardware point: the ADC error it injects, relative to each
layer's own signal.

The measured forms of `nipa.estimation.inject` hold a coarse ADC's error as calibrated noise (and exact
errors for known rows). Where that error is small against the layer's output, which error model holds it
matters little, and the estimate follows the simulator closely (docs/estimate_analysis.md, section 12:
within 1 point over the sampled points of the exploration space below a ratio of 0.1). Where it is a large
part of the signal, the simulator's deterministic rounding (a zero read off the ADC's grid, a batch's
range set by one image, a per-tensor input scale that the next layer's error moves) decides the accuracy
in ways no noise model follows, and the estimate was 5-16 points off, mostly too optimistic.

`relative_adc_error` measures, per mapped layer, rms(the estimate's ADC error) / rms(the ideal quantized
layer output) on the estimate's own layer inputs, with every device error off (so it is the ADC's part
alone); the largest over the layers is the point's figure. It costs one forward of each of two models on
one calibration batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from nipa.estimation.inject import AdcCalibration, InjectionModel, inject, injected_layers
from nipa.hardware.config import HWConfig

# Above this ratio of ADC error to signal (in any layer) the estimate is reported as untrusted. Chosen on
# the 60-point uniform sample of HW_config/Explore_space.ini (smallcnn, mnist5k; docs section 12).
TRUST_RATIO = 0.1


def _device_free(hw: HWConfig) -> HWConfig:
    return dataclasses.replace(hw, vari=0.0, ind_vari=0.0, laplace_b=0.0, SAF_prop=0.0)


@torch.no_grad()
def relative_adc_error(model: nn.Module, hw: HWConfig, errors: InjectionModel, calibration: AdcCalibration,
                       batches: Iterable[torch.Tensor], *, exclude: Sequence[str] = (),
                       include: Sequence[str] | None = None, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """Per mapped layer, rms(ADC error) / rms(ideal output) of the estimate `errors` at `hw` (device error
    off) on `batches` (inputs), each layer fed by the estimate's own upstream layers. 0 for a layer whose
    ideal output is all zero."""
    clean = _device_free(hw)
    estimate = inject(model, clean, exclude=exclude, include=include, seed=seed, calibration=calibration,
                      errors=errors).to(device).eval()
    ideal = inject(model, clean, exclude=exclude, include=include,
                   errors=InjectionModel(device="cells", adc="none")).to(device).eval()
    layers = {layer.core.name: layer for layer in injected_layers(estimate)}
    references = {layer.core.name: layer for layer in injected_layers(ideal)}
    sums = {name: [0.0, 0.0] for name in layers}

    def compare(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        reference = references[name](x).double()
        sums[name][0] += float((y.double() - reference).square().sum())
        sums[name][1] += float(reference.square().sum())

    hooks = [layer.register_forward_hook(lambda _m, args, y, name=name: compare(name, args[0], y))
             for name, layer in layers.items()]
    try:
        for batch in batches:
            estimate(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (error / signal) ** 0.5 if signal > 0 else 0.0 for name, (error, signal) in sums.items()}


def trusted(ratios: dict[str, float] | None, limit: float = TRUST_RATIO) -> bool | None:
    """Whether a point's layer ratios are all within `limit` (None when not measured)."""
    if not ratios:
        return None
    return max(ratios.values()) <= limit
