"""Measured noise of the crossbar layers: a check of the metric that does not go through the accuracy.

NIPA predicts, from weight statistics alone, how much noise each mapped layer adds; the ground truth
then turns all layers' noise into one accuracy, measured on a finite test set with a few chips. When
the correlation with accuracy is weak, it is not clear which half failed. This module measures the
first half directly: every mapped layer is fed the float model's own input to it (one batch), once
through the float layer and once through its crossbar twin (the simulator, the same chips as main.py:
same seed, same chip numbers), and the relative noise power

    E[(y_crossbar - y_float)^2] / E[y_float^2]

is averaged over the chips. Its inverse is the layer's measured signal-to-noise ratio. It includes
what the crossbar adds on top of the float layer: weight and input quantization, ADC, device errors.
Feeding the float input to every layer keeps the layers' errors apart (no propagation), as NIPA's
per-layer terms are.

Use: ``validate.py --layer_noise`` ranks the recorded points by measured SNR and reports how NIPA agrees
with it (per layer and model-level) and how the measured SNR itself agrees with the accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nipa.hardware.compat import NO_COMPAT, Compat
from nipa.hardware.config import HWConfig
from nipa.hardware.mapping import select_layers
from nipa.simulator.crossbar import calibrate_adc, convert, program_chip


@torch.no_grad()
def float_layer_io(model: nn.Module, layers: Sequence[str], inputs: torch.Tensor) -> dict[str, tuple]:
    """{layer: (its input, its output)} when the float model runs on `inputs` (forward hooks)."""
    modules = dict(model.named_modules())
    captured: dict[str, tuple] = {}
    hooks = [modules[name].register_forward_hook(
        lambda _module, args, output, name=name: captured.__setitem__(name, (args[0].detach(), output.detach())))
        for name in layers]
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in layers if name not in captured]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the model's forward pass")
    return captured


def relative_noise_power(output: torch.Tensor, reference: torch.Tensor) -> float:
    """E[(output - reference)^2] / E[reference^2] (NaN for an all-zero reference)."""
    reference = reference.double()
    power = float((reference**2).mean())
    return float(((output.double() - reference) ** 2).mean()) / power if power > 0 else float("nan")


@torch.no_grad()
def measure_layer_noise(model: nn.Module, points: Sequence[HWConfig], inputs: torch.Tensor, *, chips: int,
                        seed: int = 0, exclude: Sequence[str] = (), include: Sequence[str] | None = None,
                        per_read: bool = False, calib_inputs: Iterable[torch.Tensor] | None = None,
                        compat: Compat = NO_COMPAT,
                        progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(mapped layer names, relative noise power [points, layers], averaged over chips 0..chips-1;
    one chip for a point without device error, whose chips are all the same).

    Chips are programmed as main.py programs them (`seed`, chip numbers from 0), so the measured layers
    are those of the ground truth's chips. A point with the calibrated ADC mode is calibrated on
    `calib_inputs` (default: `inputs`).
    """
    if chips < 1:
        raise ValueError(f"chips must be >= 1, not {chips}")
    model = model.eval()
    layers = select_layers(model, exclude=exclude, include=include)
    if not layers:
        raise ValueError("no mapped layer: the selection (exclude/include) leaves nothing on crossbars")
    reference = float_layer_io(model, layers, inputs)
    calib = list(calib_inputs) if calib_inputs is not None else [inputs]
    noise = np.zeros((len(points), len(layers)))
    for index, point in enumerate(tqdm(points, desc="layer noise", unit="point", disable=not progress)):
        converted = convert(model, point, exclude=exclude, include=include, seed=seed, chip=0,
                            per_read=per_read, compat=compat).eval()
        modules = dict(converted.named_modules())
        used = chips if point.has_device_error else 1  # without device error every chip is the same
        for chip in range(used):
            if chip:
                program_chip(converted, seed, chip)
            if point.adc_mode == "calibrated":  # as main.py: the whole converted model on calibration data
                calibrate_adc(converted, calib)
            for column, name in enumerate(layers):
                x, y = reference[name]
                noise[index, column] += relative_noise_power(modules[name](x), y) / used
    return layers, noise
