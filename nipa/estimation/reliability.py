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

That figure is the ADC's error on ideal reads, which is what the estimate injects. At a point with device
error the chips' reads are not ideal: a stuck-at cell of a multi-level cell reads up to 2^c - 1 levels off
and widens a dynamic range, and the ADC step with it (at W8 I4 S128 ADC5 with 3-bit cells and stuck-at
0.001, conv1's ADC error is 4.8x larger through a programmed chip; docs/estimate_analysis.md, section 14).
`device_read_adc_error` measures the same ratio with the ADC error calibrated through one programmed chip of
the calibration's own stream (`AdcCalibration(device_reads=True)`, one batch, the output form); the
device itself stays off in both models, so it is still the ADC's part. `TrustCheck` holds both, and a point
is trusted when the larger of the two is within `TRUST_RATIO` in every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
def _layer_ratios(estimate: nn.Module, ideal: nn.Module, batches: Iterable[torch.Tensor],
                  device: torch.device | str) -> dict[str, float]:
    """Per mapped layer of `estimate`, rms(its output - the ideal layer's on the same input) / rms(ideal), each
    layer fed by the estimate's own upstream layers. 0 for a layer whose ideal output is all zero."""
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


def ideal_layers(model: nn.Module, hw: HWConfig, *, exclude: Sequence[str] = (),
                 include: Sequence[str] | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The noise-free quantized model of `hw` whose layers both parts of the check compare with (build it
    once and pass it as `ideal` to both: a language model's copy is large)."""
    return inject(model, _device_free(hw), exclude=exclude, include=include,
                  errors=InjectionModel(device="cells", adc="none")).to(device).eval()


@torch.no_grad()
def relative_adc_error(model: nn.Module, hw: HWConfig, errors: InjectionModel, calibration: AdcCalibration,
                       batches: Iterable[torch.Tensor], *, exclude: Sequence[str] = (),
                       include: Sequence[str] | None = None, seed: int = 0,
                       device: torch.device | str = "cpu", ideal: nn.Module | None = None) -> dict[str, float]:
    """Per mapped layer, rms(ADC error) / rms(ideal output) of the estimate `errors` at `hw` (device error
    off) on `batches` (inputs), each layer fed by the estimate's own upstream layers. 0 for a layer whose
    ideal output is all zero. ideal: `ideal_layers` of `hw`, when already built."""
    estimate = inject(model, _device_free(hw), exclude=exclude, include=include, seed=seed,
                      calibration=calibration, errors=errors).to(device).eval()
    ideal = ideal if ideal is not None else ideal_layers(model, hw, exclude=exclude, include=include, device=device)
    return _layer_ratios(estimate, ideal, batches, device)


@torch.no_grad()
def device_read_adc_error(model: nn.Module, hw: HWConfig, batches: Sequence[torch.Tensor], *,
                          exclude: Sequence[str] = (), include: Sequence[str] | None = None, seed: int = 0,
                          memory_mb: float = 256, device: torch.device | str = "cpu",
                          ideal: nn.Module | None = None) -> dict[str, float]:
    """Per mapped layer, rms(the ADC error of one programmed chip's reads) / rms(ideal output) at `hw`, on
    `batches`: the ADC error is calibrated through a chip of the calibration's own stream (its ranges widened
    by the device error) and injected as output noise, the device error itself off. {} at a point without
    device error (its reads are the ideal ones). ideal: `ideal_layers` of `hw`, when already built."""
    if not hw.has_device_error:
        return {}
    batches = list(batches)
    calibration = AdcCalibration(model, batches, exclude=exclude, include=include, memory_mb=memory_mb, seed=seed,
                                 device_reads=True, upstream="ideal")
    estimate = inject(model, hw, exclude=exclude, include=include, seed=seed, calibration=calibration,
                      errors=InjectionModel(device="cells", adc="measured", adc_form="output")).to(device).eval()
    for layer in injected_layers(estimate):  # the ADC error of device reads, without the device error itself
        layer.core.cells = False
        layer.redraw(seed, 0)
    ideal = ideal if ideal is not None else ideal_layers(model, hw, exclude=exclude, include=include, device=device)
    return _layer_ratios(estimate, ideal, batches, device)


@dataclass
class TrustCheck:
    """A point's trust measure: per mapped layer, the estimate's ADC error over the layer's signal on ideal
    reads (`relative_adc_error`) and through a programmed chip (`device_read_adc_error`, empty without
    device error)."""

    ideal_reads: dict[str, float]
    device_reads: dict[str, float] = field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float]:
        """Per layer, the larger of the two: the figure `trusted` judges."""
        return {name: max(ratio, self.device_reads.get(name, 0.0)) for name, ratio in self.ideal_reads.items()}


def trusted(ratios: dict[str, float] | None, limit: float = TRUST_RATIO) -> bool | None:
    """Whether a point's layer ratios are all within `limit` (None when not measured)."""
    if not ratios:
        return None
    return max(ratios.values()) <= limit
