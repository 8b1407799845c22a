"""Error injection: a PIM hardware point as one equivalent error per layer (SPEC section 7).

`inject(model, hw)` returns a copy of a model whose mapped layers (`nipa.hardware.mapping.select_layers`) are
replaced by `InjectedLinear` / `InjectedConv2d`. Such a layer holds an *effective weight*, computed once
per noise draw; its forward fake-quantizes the input per tensor to `wl_input` bits and makes one
ordinary `F.linear` / `F.conv2d` call (plus, in the output form below, one scaled add of precomputed
noise): no slicing, no bit-serial loop, no ADC.

The effective weight of one layer, W [out, fan_in] tiled into T tiles of S = subArray rows:

    q, scale_w = per-(channel, tile) quantization         (nipa.hardware.quant, as the ground truth)
    s_k        = sign-magnitude slices of q, k = 0..K-1
    s~_k       = s_k + device error_k (+ Gaussian noise)   (level units of slice k)
    W~         = scale_w[:, t] * sum_k 2^(c k) s~_k         (recombined, rescaled per tile)

Two ways to model each part; `method` picks a preset, `device` / `adc` / `adc_form` override a part.

device error (``device=``)
  ``"formula"``  Gaussian noise of variance sigma_dev,k^2 A_k on every slice value (SPEC sections 6-7),
                 from the layer's own bit statistics through `nipa.estimation.metric.layer_slice_noise`, the
                 metric's own formula.
  ``"cells"``    the cell model itself (`nipa.hardware.device_errors.program_pairs`): every slice goes on a
                 differential pair of cells that receive variation of the configured type and stuck-at
                 faults (a cell stuck at G_min or G_max). This is exactly the ground truth's
                 programming error in distribution; a stuck-at-1 cell on a zero slice adds 2^c - 1
                 levels, which no variance over var_k describes well.

ADC error (``adc=``)
  ``"formula"``  ADC_k = k_T S density_k^2 / (12 4^a_r) per weight and slice (SPEC section 6, the
                 published approximation), as weight noise.
  ``"measured"`` the error the ground truth's ADC actually makes, from one calibration pass
                 (`AdcCalibration`) through the noise-free quantized model on training data. The
                 simulator quantizes every (tile t, input bit z, slice k) read P with the step
                 range_{t,z,k} / 2^a_r of that batch's reads; one input row's output then errs by
                 E_{t,o} = sum_{z,k} 2^z 2^(ck) e_{t,z,k}, e = ADC(P) - P, times scale_in scale_w[o, t].
                 The calibration forms the real reads (every row for the ranges, a sample of rows for
                 the errors), applies the simulator's rounding for each ADC resolution and keeps
                 E[E_{t,o}^2] per (output, tile). The errors are summed before squaring: a saturated
                 input has the same read in every bit plane, and similar ranges round them alike, so the
                 bit errors add coherently (3x the power of independent errors in SmallCNN's conv1).
                 One pass serves every ADC resolution of a (wl_weight, subArray, cellBit, wl_input,
                 ADC mode); the reads are those of ideal cells. ``AdcCalibration(device_reads=True)``
                 reads through one programmed chip of the calibration's own stream at a point with
                 device error (one pass per device setting then): a dynamic range widens with the
                 device's spread and the ADC step with it (the largest term at 3-bit ADCs with
                 variation 0.3, docs/estimate_analysis.md; off by default: it triples the calibration
                 passes of the main grid and was measured on 13 of its points only). A dynamic range is one
                 batch's: calibrate on several batches (wrap_error.py: 4), one misjudges it up to 3x.
  ``"none"``     an ideal ADC.

form of the measured ADC error (``adc_form=``)
  ``"output"``   fresh Gaussian noise on every layer output, variance scale_in^2 sum_t scale_w[o, t]^2
                 E[E_{t,o}^2] per output channel: the ADC error of a chip is a new error on every read,
                 not a fixed change of the function. (The standard normals come from a pool drawn once
                 per draw and read at a random offset by each forward, so the noise costs one add.)
  ``"weight"``   the same power as Gaussian weight noise fixed per draw, v_{t,o} = E[E_{t,o}^2] /
                 E||x_q,t||^2. It matches the mean error power but not its form: a fixed perturbation
                 of the function misclassifies whole groups of inputs at once, so draws scatter widely
                 and 4-bit ADC points come out too pessimistic (README, "Error injection").
  ``"conditional"`` the error as a function of the ideal output: per output channel, bins of the ideal
                 output u (measured on a second sample of rows, the same rows in every tile); each
                 forward adds the bin's mean error (exactly) and fresh noise of the bin's deviation.
                 A fixed-range ADC's error is a function of the read, which this holds; a dynamic
                 range moves its grid with every batch, so only what the batches share is held.

  ``"planes"``   per (tile, input bit) plane of each input row, by its class
                 (`nipa.estimation.plane_states`): a plane with no row set, or every row set with one
                 sign (zero patches, a constant background), has a known read, and gets the ADC's exact
                 error of that read (averaged over the calibration batches' ranges), no noise; the other
                 planes, classed by how many rows they set, get their class's mean error and fresh noise
                 of its deviation. A deterministic ADC errs alike on every repeated patch, which noise of
                 the same power does not describe (docs/estimate_analysis.md). It calibrates on the
                 simulator's own activations (`AdcCalibration(upstream="simulated")`, ideal cells and the
                 point's ADC): a coarse ADC's offsets upstream move the ranges and zero patches of the
                 layers below.

  ``"repeated"`` the input rows a layer reads again and again (a constant background, zero patches:
                 at least 1% of its calibration rows, up to 16) get the ADC's exact error of that row, no
                 noise, where the calibration batches agree on it (a dynamic range that moves with the
                 batch moves the row's error: then it is noise like the rest); every other row gets fresh
                 output noise of the other rows' power (`nipa.estimation.repeated_rows`). Calibrated on
                 the simulator's activations, like the planes form. It holds what makes noise of the same
                 power too harmful at 4-5-bit ADCs with 4-bit inputs (docs/estimate_analysis.md, section 10).

Presets (``method=``): ``"published"`` = formula + formula (SPEC section 7 as written);
``"calibrated"`` = cells + measured + output form; ``"conditional"`` = cells + measured + conditional
form; ``"planes"`` = cells + measured + planes form; ``"repeated"`` = cells + measured + repeated form
(`DEFAULT_METHOD`, the default of wrap_error.py, explore.py --verify and `nipa.estimate`).

Draws. `inject(..., seed, draw)` and `redraw(model, seed, draw)` are deterministic: layer `name` of
draw `d` draws from `chip_generator(seed, d, crc32("inject:" + name))`, a stream independent of the
ground truth's chips (crc32(name)), so a prediction never shares a chip with the simulation it is
compared with; ``paired=True`` uses the simulator's chip streams for the cells instead (a diagnostic:
draw d then carries exactly chip d's programming errors). The output noise of a draw restarts with
`redraw`, so the same data in the same order give the same result. Weights are drawn on the CPU (the
same numbers on every device).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nipa.estimation.metric import layer_slice_noise
from nipa.estimation.plane_states import (
    ALL_NEGATIVE,
    ALL_POSITIVE,
    KNOWN,
    ZERO,
    conv_plane_classes,
    linear_plane_classes,
    num_classes,
    row_classes,
    tile_row_counts,
)
from nipa.estimation.repeated_rows import (
    CANDIDATE_SHARE,
    MAX_ROWS,
    RowTally,
    conv_hashes,
    hash_weights,
    match,
    row_hashes,
)
from nipa.estimation.repeated_rows import conv_error as repeated_conv_error
from nipa.estimation.repeated_rows import kernel_takes as repeated_kernel_takes
from nipa.estimation.stats import ComboStats, ModelStats, model_statistics
from nipa.hardware.config import HWConfig
from nipa.hardware.device_errors import chip_generator, program_pairs
from nipa.hardware.mapping import as_linear, is_mappable, select_layers, set_submodule
from nipa.hardware.quant import (
    max_level,
    quantize_input,
    quantize_weight_tiles,
    slice_magnitude,
    slice_significance,
    tile_columns,
    untile_columns,
)
from nipa.simulator.crossbar import _explicit_padding, im2col

DEVICE_MODELS = ("formula", "cells")
ADC_MODELS = ("formula", "measured", "none")
ADC_FORMS = ("weight", "output", "conditional", "planes", "repeated")
FORM_TAGS = {"output": "-out", "conditional": "-cond", "planes": "-planes", "repeated": "-rep"}  # file-name tags
METHODS = {"published": ("formula", "formula", "weight"), "calibrated": ("cells", "measured", "output"),
           "conditional": ("cells", "measured", "conditional"), "planes": ("cells", "measured", "planes"),
           "repeated": ("cells", "measured", "repeated")}
# wrap_error.py's, explore.py's and nipa.estimate's method: the best measured (README, "wrap_error.py").
DEFAULT_METHOD = "repeated"


@dataclass(frozen=True)
class InjectionModel:
    """Which error model each part uses (see the module docstring)."""

    device: str = "formula"
    adc: str = "formula"
    tile_factor: str = "tiles"  # k_T of the formula ADC term ("tiles" = T, "one" = 1)
    # measured ADC error as weight noise, as fresh output noise per forward, or as a function of the ideal
    # output (per bin of it, the error's mean plus fresh noise of its deviation)
    adc_form: str = "weight"

    def __post_init__(self) -> None:
        if self.adc_form not in ADC_FORMS:
            raise ValueError(f"ADC error form must be one of {ADC_FORMS}, not {self.adc_form!r}")
        if self.device not in DEVICE_MODELS:
            raise ValueError(f"device error model must be one of {DEVICE_MODELS}, not {self.device!r}")
        if self.adc not in ADC_MODELS:
            raise ValueError(f"ADC error model must be one of {ADC_MODELS}, not {self.adc!r}")

    @classmethod
    def of(cls, method: str = "published", device: str | None = None, adc: str | None = None,
           tile_factor: str = "tiles", adc_form: str | None = None) -> InjectionModel:
        if method not in METHODS:
            raise ValueError(f"injection method must be one of {tuple(METHODS)}, not {method!r}")
        preset_device, preset_adc, preset_form = METHODS[method]
        return cls(device or preset_device, adc or preset_adc, tile_factor, adc_form or preset_form)

    def slug(self) -> str:
        """A short file-name tag: the preset's name, or device-adc[-kT1]."""
        for name, (device, adc, form) in METHODS.items():
            if (self.device, self.adc, self.tile_factor, self.adc_form) == (device, adc, "tiles", form):
                return name
        return (f"{self.device}-{self.adc}" + ("-kT1" if self.tile_factor == "one" else "")
                + (FORM_TAGS.get(self.adc_form, "") if self.adc == "measured" else ""))

    def label(self) -> str:
        return (f"device={self.device},adc={self.adc}" + (",kT=1" if self.tile_factor == "one" else "")
                + (f",adc_form={self.adc_form}" if self.adc_form != "weight" and self.adc == "measured" else ""))


# ----------------------------------------------------------------------------------------------------
# Injected layers
# ----------------------------------------------------------------------------------------------------


class InjectedCore(nn.Module):
    """The quantized slices of one weight matrix and the noise that one draw adds to them.

    weight_var: the variance of the Gaussian noise added to every integer weight level, broadcastable
    to [out, T] (formula terms: sum_k 4^(ck) v_k; measured ADC: per output and tile). With ``cells``
    the device error comes from the cell model on top of it.
    """

    def __init__(self, weight: torch.Tensor, hw: HWConfig, name: str, weight_var: torch.Tensor,
                 cells: bool, output_power: torch.Tensor | None = None,
                 conditional: tuple[torch.Tensor, ...] | None = None,
                 planes: tuple[torch.Tensor, torch.Tensor] | None = None,
                 repeated: tuple[torch.Tensor, ...] | None = None) -> None:
        super().__init__()
        self.hw = hw
        self.name = name
        self.cells = cells and hw.has_device_error
        self.weight_shape = tuple(weight.shape)
        matrix = weight.detach().reshape(weight.shape[0], -1).float().cpu()
        self.out_features, self.fan_in = matrix.shape
        # As the ground truth: a fan-in below the crossbar height is one tile of fan_in rows.
        self.rows = min(hw.subArray, self.fan_in)
        q, scale = quantize_weight_tiles(tile_columns(matrix, self.rows), hw.wl_weight)
        self.num_tiles = q.shape[1]
        self.weight_scale = scale  # [out, T]
        # [K, out, T, rows]; |s| < 2^c <= 256 fits int8 up to cellBit 7 (a quarter of float32's memory).
        slices = slice_magnitude(q, hw.wl_weight, hw.cellBit)
        self.slices = slices.to(torch.int8) if hw.cellBit <= 7 else slices
        weight_var = torch.as_tensor(weight_var, dtype=torch.float64).cpu().clamp(min=0)
        std = weight_var.sqrt().float()
        self.weight_noise_std = std.expand(self.out_features, self.num_tiles).contiguous()
        # Fresh output noise per forward (adc_form="output"), per output channel, in units of
        # scale_w * (integer read): sum_t scale_w[o, t]^2 E_{t,o}; multiplied by the input scale later.
        # A buffer: it follows the layer's .to(), so no forward copies it to the device (a blocking
        # host-to-device copy per layer and batch). Not persistent: the state dict stays the model's.
        output_std = None
        if output_power is not None:
            power = (output_power.double() * self.weight_scale.double() ** 2).sum(-1)
            output_std = power.sqrt().float()
        # adc_form="repeated": the repeated rows' hashes and exact errors [M, out] (units of scale_w * level)
        # and, as the output form's, the noise of every other row.
        for buffer in ("repeated_weights", "repeated_hashes", "repeated_errors"):
            self.register_buffer(buffer, None, persistent=False)
        if repeated is not None:
            weights, hashes, errors, rest_variance = repeated
            output_std = rest_variance.clamp(min=0).sqrt().float().expand(self.out_features).contiguous()
            if hashes.shape[0]:
                self.repeated_weights, self.repeated_hashes = weights, hashes.to(weights.dtype)
                self.repeated_errors = errors.float()
        self.register_buffer("output_std", output_std, persistent=False)
        # adc_form="conditional": per output channel, equal-width bins of u = (y - bias) / scale_in and per
        # bin the error's mean and deviation (flattened [out * bins] for one gather per forward).
        self.conditional_bins = 0
        for buffer in ("cond_lo", "cond_inv_width", "cond_mean", "cond_std"):
            self.register_buffer(buffer, None, persistent=False)
        # adc_form="planes": the mean error and variance per (plane class, bit, tile, output)
        # [C, Z, T, out], in units of scale_w * (integer read) (nipa.estimation.plane_states).
        self.register_buffer("plane_mean", None, persistent=False)
        self.register_buffer("plane_var", None, persistent=False)
        if planes is not None:
            mean, var = planes  # [C, Z, T, out]
            scale = self.weight_scale.t().float()  # [T, out]
            self.plane_mean, self.plane_var = mean.float() * scale, var.float() * scale.square()
        if conditional is not None:
            lo, width, mean, std = conditional
            self.conditional_bins = mean.shape[1]
            self.cond_lo, self.cond_inv_width = lo.float(), (1 / width).float()
            self.cond_mean, self.cond_std = mean.reshape(-1).float(), std.reshape(-1).float()

    def effective_weight(self, seed: int, draw: int, paired: bool = False) -> torch.Tensor:
        """One draw of the error-injected weight, in the original weight's shape (float32, CPU).

        paired: the cells of draw `draw` come from the simulator's own stream of chip `draw`
        (`nipa.simulator.crossbar.CrossbarCore.program`), i.e. the very chip main.py simulated; a diagnostic
        that separates the method's error from the sampling of chips.
        """
        generator = chip_generator(seed, draw, zlib.crc32(f"inject:{self.name}".encode()))
        significance = slice_significance(self.hw.num_slices, self.hw.cellBit).view(-1, 1, 1, 1)
        slices = self.slices.float()
        if self.cells:
            cells = chip_generator(seed, draw, zlib.crc32(self.name.encode())) if paired else generator
            levels = (program_pairs(slices, self.hw, cells) * significance).sum(0)
        else:
            levels = (slices * significance).sum(0)  # == q exactly
        if bool((self.weight_noise_std > 0).any()):
            noise = torch.randn(levels.shape, generator=generator)
            levels = levels + noise * self.weight_noise_std.unsqueeze(-1)
        matrix = untile_columns(levels * self.weight_scale.unsqueeze(-1), self.fan_in)
        return matrix.reshape(self.weight_shape)


class _InjectedLayer(nn.Module):
    def _setup(self, layer: nn.Module, core: InjectedCore) -> None:
        self.core = core
        self.wl_input = core.hw.wl_input
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=False)
        self.register_buffer("weight", layer.weight.detach().clone())
        # The pool's normals: made on the device of the output at the first forward of a draw (and again
        # if the layer has moved since), so the stream always lives where the outputs are.
        self.output_generator: torch.Generator | None = None
        self.output_stream: tuple[int, int, int] | None = None  # (seed, draw, stream id) of that generator
        self.offset_generator: torch.Generator | None = None  # offsets, on the CPU: no device sync
        self.noise_pool: torch.Tensor | None = None
        self.paired = False

    def redraw(self, seed: int, draw: int) -> None:
        """Replace the effective weight by draw `draw` of seed `seed` (and restart the output noise
        stream of that draw, so an evaluation of the same data in the same order repeats exactly)."""
        weight = self.core.effective_weight(seed, draw, self.paired)
        self.weight = weight.to(self.weight.device, self.weight.dtype)
        self.noise_pool = None
        self.output_generator, self.output_stream = None, None
        if self.core.output_std is not None or self.core.conditional_bins or self.core.plane_mean is not None:
            name = f"inject-out:{self.core.name}".encode()
            self.output_stream = (seed, draw, zlib.crc32(name))
            self.offset_generator = chip_generator(seed, draw, zlib.crc32(name + b":offset"))

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantized input and its per-tensor scale: nipa.hardware.quant.quantize_input's operations in
        the same order (so the same values), chained in place on one new tensor."""
        levels = max_level(self.wl_input)
        low, high = torch.aminmax(x.detach())  # max|x| without an |x| temporary
        scale = torch.maximum(-low, high) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # as nipa.hardware.quant.input_scale
        return torch.div(x, scale).round_().clamp_(-levels, levels).mul_(scale), scale

    def _plane_error(self, y: torch.Tensor, classes: torch.Tensor, scale_in: torch.Tensor,
                     channel_dim: int) -> torch.Tensor:
        """y + scale_in (per plane class, its mean error and fresh noise of its deviation), from the
        plane classes [n, Z, T, OH, OW] (conv) or [..., Z, T] (linear). Each output sums one table row
        per (bit, tile): one embedding bag per table, no one-hot tensor."""
        core = self.core
        _, bits, tiles, out = core.plane_mean.shape
        if channel_dim == 1:
            classes = classes.permute(0, 3, 4, 1, 2)  # [n, OH, OW, Z, T]
        shape = classes.shape[:-2]
        slot = torch.arange(bits * tiles, device=classes.device).view(bits, tiles)
        index = (classes * (bits * tiles) + slot).reshape(-1, bits * tiles)
        offset = F.embedding_bag(index, core.plane_mean.reshape(-1, out), mode="sum")
        std = F.embedding_bag(index, core.plane_var.reshape(-1, out), mode="sum").clamp_(min=0).sqrt_()
        # In the [rows, out] layout of the tables (the normals' layout does not matter): one strided
        # pass over a convolution's output at the end, not one per operation.
        error = offset.addcmul_(self._normals(offset), std).mul_(scale_in)
        if channel_dim == 1:
            return y.add_(error.view(*shape, out).permute(0, 3, 1, 2))
        return y.add_(error.view(y.shape))

    def _repeated_error(self, y: torch.Tensor, hashes: torch.Tensor, scale_in: torch.Tensor,
                        channel_dim: int) -> torch.Tensor:
        """y + scale_in (the exact error of a repeated row, fresh noise of the other rows' deviation
        elsewhere), from the input rows' hashes [2, ...] (an output position's row: [2, n, OH, OW])."""
        core = self.core
        index = match(hashes, core.repeated_hashes)
        other = index < 0
        # One gather of the exact errors (a zero row for the other rows), read in the output's layout.
        table = F.pad(core.repeated_errors.to(dtype=y.dtype) * scale_in, (0, 0, 0, 1))  # [M + 1, out]
        flat = torch.where(other, torch.full_like(index, table.shape[0] - 1), index).reshape(-1)
        std = core.output_std.to(dtype=y.dtype) * scale_in
        if channel_dim == 1:  # [out, n * OH * OW] viewed as [n, out, OH, OW]: positions stay contiguous
            n, out = y.shape[:2]
            exact = table.t().index_select(1, flat).view(out, n, -1).transpose(0, 1).view(y.shape)
            noise = self._normals(y) * other.view(n, 1, *y.shape[2:]).to(y.dtype)
            return y.addcmul_(noise, std.view(1, -1, 1, 1)).add_(exact)
        exact = table.index_select(0, flat).view(y.shape)
        noise = self._normals(y) * other.unsqueeze(-1).to(y.dtype)
        return y.addcmul_(noise, std).add_(exact)

    def _output_noise(self, y: torch.Tensor, scale_in: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        if self.core.conditional_bins:
            return self._conditional_noise(y, scale_in, channel_dim, shape)
        if self.core.output_std is None:
            return y
        std = self.core.output_std.to(dtype=y.dtype).view(shape) * scale_in  # already on y's device
        return y.addcmul_(self._normals(y), std)

    def _conditional_noise(self, y: torch.Tensor, scale_in: torch.Tensor, channel_dim: int,
                           shape: list[int]) -> torch.Tensor:
        """y + scale_in (mean[o, bin(u)] + std[o, bin(u)] N(0, 1)), u = (y - bias) / scale_in."""
        core, bins = self.core, self.core.conditional_bins
        u = y if self.bias is None else y - self.bias.view(shape)
        u = u / scale_in
        index = (u - core.cond_lo.view(shape)).mul_(core.cond_inv_width.view(shape)).floor_().clamp_(0, bins - 1)
        base = (torch.arange(y.shape[channel_dim], device=y.device, dtype=y.dtype) * bins).view(shape)
        index = index.add_(base).long()
        noise = self._normals(y)
        error = torch.take(core.cond_mean, index).addcmul_(torch.take(core.cond_std, index), noise)
        return y.add_(error.mul_(scale_in))

    def _normals(self, y: torch.Tensor) -> torch.Tensor:
        """Standard normals shaped as y. They come from a pool drawn once per draw, 1.25 times the output
        size, read at a random offset by every forward: generating fresh normals for every output costs as
        much as the layer itself on a CPU. Within a batch every output still gets its own value."""
        numel = y.numel()
        if self.output_generator is None or self.output_generator.device != y.device:
            seed, draw, stream = self.output_stream
            self.output_generator = chip_generator(seed, draw, stream, y.device)
            self.noise_pool = None
        if self.noise_pool is None or self.noise_pool.numel() < numel or self.noise_pool.dtype != y.dtype:
            self.noise_pool = torch.randn(numel + numel // 4 + 1, generator=self.output_generator,
                                          device=y.device, dtype=y.dtype)
        offset = int(torch.randint(0, self.noise_pool.numel() - numel + 1, (1,),
                                   generator=self.offset_generator))
        return self.noise_pool[offset:offset + numel].view(y.shape)


class InjectedLinear(_InjectedLayer):
    """`nn.Linear` with an error-injected weight and fake-quantized input."""

    def __init__(self, layer: nn.Linear, core: InjectedCore) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._setup(layer, core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, scale_in = self._quantized_input(x)
        y = F.linear(x, self.weight, self.bias)
        if self.core.repeated_hashes is not None:
            levels = torch.round(x / scale_in)
            hashes = row_hashes(levels.reshape(-1, levels.shape[-1]), self.core.repeated_weights)
            return self._repeated_error(y, hashes.t().reshape(2, *levels.shape[:-1]), scale_in, -1)
        if self.core.plane_mean is not None:
            classes = linear_plane_classes(torch.round(x / scale_in), self.wl_input - 1, self.core.fan_in,
                                           self.core.rows)
            return self._plane_error(y, classes, scale_in, -1)
        return self._output_noise(y, scale_in, -1)


class InjectedConv2d(_InjectedLayer):
    """`nn.Conv2d` (groups 1) with an error-injected weight and fake-quantized input."""

    def __init__(self, layer: nn.Conv2d, core: InjectedCore) -> None:
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError(f"{core.name}: only groups=1, zero-padded convolutions are mapped")
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.kernel_size = layer.kernel_size
        self._setup(layer, core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-tensor scale of the layer input itself (before zero padding), as the ground truth.
        x, scale_in = self._quantized_input(x)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        core = self.core
        if core.repeated_hashes is not None:
            padding = _explicit_padding(self)
            errors = core.repeated_errors.to(dtype=y.dtype) * scale_in
            std = core.output_std.to(dtype=y.dtype) * scale_in
            # One pass of C where it runs (the same values as the PyTorch operations below).
            if repeated_kernel_takes(core.repeated_hashes.shape[0], y, x, errors, std):
                return repeated_conv_error(y, x, scale_in, core.repeated_weights, core.repeated_hashes, errors,
                                           std, self._normals(y), self.kernel_size, self.stride, padding,
                                           self.dilation)
            hashes = conv_hashes(torch.round(x / scale_in), core.repeated_weights, self.kernel_size,
                                 self.stride, padding, self.dilation)
            return self._repeated_error(y, hashes, scale_in, 1)
        if self.core.plane_mean is not None:
            classes = conv_plane_classes(torch.round(x / scale_in), self.wl_input - 1, self.core.weight_shape,
                                         self.core.rows, self.stride, _explicit_padding(self), self.dilation)
            return self._plane_error(y, classes, scale_in, 1)
        return self._output_noise(y, scale_in, 1)


def injected_layers(model: nn.Module) -> list[_InjectedLayer]:
    return [m for m in model.modules() if isinstance(m, _InjectedLayer)]


def redraw(model: nn.Module, seed: int, draw: int) -> None:
    """Draw the errors of every injected layer anew (like `nipa.simulator.crossbar.program_chip`)."""
    for layer in injected_layers(model):
        layer.redraw(seed, draw)


# ----------------------------------------------------------------------------------------------------
# ADC calibration: the output error power of the real reads, measured on calibration data
# ----------------------------------------------------------------------------------------------------


def _layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as the rows the crossbar reads: [n, fan_in] (im2col for a convolution)."""
    if not isinstance(layer, InjectedConv2d):
        return x.reshape(-1, x.shape[-1])
    padding = _explicit_padding(layer)
    if any(padding):
        x = F.pad(x, padding)
    rows = im2col(x, layer.kernel_size, layer.stride, layer.dilation)
    return rows.reshape(-1, rows.shape[-1])


def _distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows, multiplicities). Finding them is a sort; when a sample of rows shows few
    repeats (a deep layer's inputs) the rows are kept as they are, each with multiplicity 1."""
    sample = rows[:: max(1, rows.shape[0] // 2048)]  # spread over the batch, not one image's rows
    if torch.unique(sample, dim=0).shape[0] > 0.8 * sample.shape[0]:
        return rows, torch.ones(rows.shape[0], dtype=torch.int64, device=rows.device)
    return torch.unique(rows, dim=0, return_counts=True)


class _Reads:
    """The noise-free reads of one layer on one batch: P [Z, c, K*out] for the distinct input rows of
    each tile (identical rows give identical reads; a convolution's im2col rows repeat a lot), formed
    chunk by chunk within the memory budget."""

    def __init__(self, rows: torch.Tensor, scale_in: torch.Tensor, core: InjectedCore, memory_mb: float,
                 sample_rows: int, generator: torch.Generator, cells: torch.Tensor | None = None) -> None:
        hw = core.hw
        x_q, _ = quantize_input(rows.float(), hw.wl_input, scale_in)
        x_tiles = tile_columns(x_q, core.rows)  # [n, T, rows]
        self.n, self.num_tiles, self.r = x_tiles.shape
        self.input_power = (x_tiles.double() ** 2).sum(-1).mean(0)  # [T]
        self.z, self.k, self.out = hw.wl_input - 1, hw.num_slices, core.out_features
        self.tiles = [_distinct_rows(x_tiles[:, t]) for t in range(self.num_tiles)]
        self.x_tiles = x_tiles
        self.fan_in = core.fan_in
        self.weight_scale = core.weight_scale.to(rows.device)  # [out, T]
        # The cells read: the ideal slices, or one programmed chip's differential reads (device_reads).
        self.slices = (core.slices if cells is None else cells).to(rows.device, torch.float32)
        budget = max(1, int(memory_mb * 2**20 / 4))
        self.chunk = max(1, budget // max(1, 3 * self.z * (self.k * self.out + self.r)))
        self.sample_rows = sample_rows
        self.generator = generator

    def _products(self, t: int, rows: torch.Tensor) -> torch.Tensor:
        """P [Z, c, K*out] of some input rows [c, rows] of tile t."""
        columns = self.slices[:, :, t].reshape(self.k * self.out, self.r).t()  # [rows, K*out]
        magnitude, sign = rows.abs().to(torch.int32), torch.sign(rows)
        planes = torch.stack([((magnitude >> bit) & 1).to(sign.dtype) * sign for bit in range(self.z)])
        return (planes.view(-1, self.r) @ columns).view(self.z, -1, self.k * self.out)

    def _significance(self, cell_bits: int) -> torch.Tensor:
        """[Z, 1, K, 1]: 2^z 2^(c k), the weight of input bit z and slice k in a row's output."""
        device = self.slices.device
        return (2.0 ** torch.arange(self.z, device=device)).view(-1, 1, 1, 1) * (
            2.0 ** (cell_bits * torch.arange(self.k, device=device))).view(1, 1, -1, 1)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) [T, Z, K]: the smallest and largest read of the batch (its dynamic ADC range)."""
        lo = torch.full((self.num_tiles, self.z, self.k), math.inf, device=self.slices.device)
        hi = torch.full_like(lo, -math.inf)
        for t in range(self.num_tiles):
            tile = self.tiles[t][0]
            for start in range(0, tile.shape[0], self.chunk):
                reads = self._products(t, tile[start:start + self.chunk]).view(self.z, -1, self.k, self.out)
                lo[t] = torch.minimum(lo[t], reads.amin(dim=3).amin(dim=1))
                hi[t] = torch.maximum(hi[t], reads.amax(dim=3).amax(dim=1))
        return lo, hi

    def error_power(self, lo: torch.Tensor, hi: torch.Tensor, adc_bits: Sequence[int],
                    cell_bits: int) -> dict[int, torch.Tensor]:
        """Per ADC resolution a: E over rows of (sum_{z,k} 2^z 2^(ck) e_{t,z,k})^2 per (output, tile)
        [out, T], e = ADC(P) - P with the simulator's rounding rule. The errors of one row's bit and
        slice reads are summed before squaring, so their correlations count (a saturated input has
        identical reads in every bit plane, and similar ranges round them alike). The mean runs over
        `sample_rows` rows drawn with their multiplicities (all distinct rows when fewer)."""
        device = self.slices.device
        significance = self._significance(cell_bits)  # [Z, 1, K, 1]
        power = {a: torch.zeros(self.out, self.num_tiles, dtype=torch.float64, device=device)
                 for a in adc_bits}
        for t in range(self.num_tiles):
            tile, counts = self.tiles[t]
            if tile.shape[0] > self.sample_rows:
                pick = torch.multinomial(counts.double().cpu(), self.sample_rows, replacement=True,
                                         generator=self.generator).to(tile.device)
                tile, weight = tile[pick], torch.full((self.sample_rows,), 1.0 / self.sample_rows,
                                                      dtype=torch.float64, device=device)
            else:
                weight = counts.double() / self.n
            lo_t = lo[t].view(self.z, 1, self.k, 1)
            span = hi[t].view(self.z, 1, self.k, 1) - lo_t
            for start in range(0, tile.shape[0], self.chunk):
                reads = self._products(t, tile[start:start + self.chunk]).view(self.z, -1, self.k, self.out)
                w = weight[start:start + self.chunk, None]
                for a in adc_bits:
                    error = _read_error(reads, lo_t, span / 2**a, 2**a)
                    total = error.mul_(significance).sum(dim=(0, 2))  # [c, out]
                    power[a][:, t] += (total.double().square_() * w).sum(0)
        return power

    def joint_errors(self, lo: torch.Tensor, hi: torch.Tensor, adc_bits: Sequence[int],
                     cell_bits: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(u [m, out], {a: err [m, out]}) for `sample_rows` rows drawn uniformly (the same rows in every
        tile): the ideal layer output u = sum_t scale_w[o, t] y_{t,o} and its ADC error
        sum_t scale_w[o, t] E_{t,o}, in units of the input scale (u times scale_in is the layer output)."""
        device = self.slices.device
        if self.n > self.sample_rows:
            pick = torch.randint(0, self.n, (self.sample_rows,), generator=self.generator).to(device)
            x = self.x_tiles[pick]
        else:
            x = self.x_tiles
        u = torch.zeros(x.shape[0], self.out, dtype=torch.float64, device=device)
        errors = {a: torch.zeros_like(u) for a in adc_bits}
        for rows, scale, ideal, tile_errors in self._tile_errors(x, lo, hi, adc_bits, cell_bits):
            u[rows] += ideal.double() * scale
            for a, error in tile_errors.items():
                errors[a][rows] += error.double() * scale
        return u, errors

    def _tile_errors(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, adc_bits: Sequence[int],
                     cell_bits: int):
        """Per tile and chunk of the rows x [m, T, rows]: (the chunk's slice, scale_w[:, t] as float64, the
        ideal tile output sum_{z,k} 2^z 2^(ck) P [c, out], per ADC resolution its error E_{t,o} [c, out])."""
        significance = self._significance(cell_bits)  # [Z, 1, K, 1]
        for t in range(self.num_tiles):
            lo_t = lo[t].view(self.z, 1, self.k, 1)
            span = hi[t].view(self.z, 1, self.k, 1) - lo_t
            scale = self.weight_scale[:, t].double()
            for start in range(0, x.shape[0], self.chunk):
                reads = self._products(t, x[start:start + self.chunk, t]).view(self.z, -1, self.k, self.out)
                rows = slice(start, start + reads.shape[1])
                yield rows, scale, (reads * significance).sum(dim=(0, 2)), {
                    a: _read_error(reads, lo_t, span / 2**a, 2**a).mul_(significance).sum(dim=(0, 2))
                    for a in adc_bits}

    def row_errors(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, adc_bits: Sequence[int],
                   cell_bits: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per ADC resolution, (error [m, out], power [m, out]) of the rows x [m, T, rows] (integer levels)
        at this batch's ranges: sum_t scale_w[o, t] E_{t,o} and sum_t scale_w[o, t]^2 E_{t,o}^2 (the
        units of `joint_errors`)."""
        device = self.slices.device
        result = {a: (torch.zeros(x.shape[0], self.out, dtype=torch.float64, device=device),
                      torch.zeros(x.shape[0], self.out, dtype=torch.float64, device=device)) for a in adc_bits}
        for rows, scale, _, tile_errors in self._tile_errors(x, lo, hi, adc_bits, cell_bits):
            for a, tile_error in tile_errors.items():
                error, power = result[a]
                error[rows] += tile_error.double() * scale
                power[rows] += tile_error.double().square() * scale.square()
        return result

    def repeated_rows(self, name: str, lo: torch.Tensor, hi: torch.Tensor, adc_bits: Sequence[int],
                      cell_bits: int, tallies: dict[int, RowTally]) -> None:
        """Count this batch's candidate repeated rows (`nipa.estimation.repeated_rows`) into `tallies`
        (per ADC resolution): their exact errors at this batch's ranges, and the mean error power of a
        sample of the other rows."""
        levels = untile_columns(self.x_tiles, self.fan_in)
        weights = hash_weights(name, self.fan_in, max_level(self.z + 1))
        keys, inverse, counts = torch.unique(row_hashes(levels, weights), dim=0,
                                             return_inverse=True, return_counts=True)
        order = counts.argsort(descending=True)[:2 * MAX_ROWS]
        candidates = order[counts[order] >= CANDIDATE_SHARE * self.n]
        first = torch.full((keys.shape[0],), self.n, dtype=torch.long, device=levels.device).scatter_reduce(
            0, inverse, torch.arange(self.n, device=levels.device), "amin")[candidates]
        others = ~torch.isin(inverse, candidates)
        if bool(others.any()):
            pick = torch.multinomial(others.double().cpu(), self.sample_rows, replacement=True,
                                     generator=self.generator).to(levels.device)
        else:
            pick = torch.zeros(0, dtype=torch.long, device=levels.device)
        exact = self.row_errors(self.x_tiles[first], lo, hi, adc_bits, cell_bits)
        sampled = self.row_errors(self.x_tiles[pick], lo, hi, adc_bits, cell_bits)
        for a in adc_bits:
            others_mean = sampled[a][1].mean(0) if pick.numel() else torch.zeros(self.out, dtype=torch.float64)
            tallies[a].add_batch(self.n, levels[first].cpu(), keys[candidates].cpu(), counts[candidates].cpu(),
                                 exact[a][0].cpu(), exact[a][1].cpu(), others_mean.cpu())

    def plane_errors(self, lo: torch.Tensor, hi: torch.Tensor, adc_bits: Sequence[int], cell_bits: int,
                     tile_rows: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """Per ADC resolution, the error sums of the "planes" form (nipa.estimation.plane_states), per
        (class, bit, tile, output), integer units before scale_w: for the known reads (zero, all positive,
        all negative) the exact error of the read, weighted by the batch's rows of that class; for mixed
        planes the sum and square sum of 2^z sum_k 2^(ck) e over `sample_rows` rows drawn uniformly.
        sum, square [C, Z, T, out]; count [C, Z, T]; exact [3, Z, T, out] (the known reads' errors)."""
        device = self.slices.device
        z_weight = (2.0 ** torch.arange(self.z, device=device)).view(-1, 1, 1)  # [Z, 1, 1]
        k_weight = (2.0 ** (cell_bits * torch.arange(self.k, device=device))).view(1, -1, 1)  # [1, K, 1]
        classes = row_classes(self.x_tiles, self.z, tile_rows)  # [n, T, Z]
        num = num_classes()
        class_counts = F.one_hot(classes, num).sum(0).permute(2, 1, 0).double()  # [C, Z, T]
        column_sums = self.slices.sum(-1)  # [K, out, T]: the read of an all-ones plane
        if self.n > self.sample_rows:
            pick = torch.randint(0, self.n, (self.sample_rows,), generator=self.generator).to(device)
        else:
            pick = torch.arange(self.n, device=device)
        sample, sample_classes = self.x_tiles[pick], classes[pick]
        result = {}
        for a in adc_bits:
            levels = 2**a
            total = torch.zeros(num, self.z, self.num_tiles, self.out, dtype=torch.float64, device=device)
            square = torch.zeros_like(total)
            count = torch.zeros(num, self.z, self.num_tiles, dtype=torch.float64, device=device)
            exact = torch.zeros(KNOWN, self.z, self.num_tiles, self.out, dtype=torch.float64, device=device)
            for t in range(self.num_tiles):
                lo_t = lo[t].view(self.z, self.k, 1)  # [Z, K, 1] for the known reads [Z, K, out]
                step = (hi[t].view(self.z, self.k, 1) - lo_t) / levels
                known_error = partial(_read_error, lo=lo_t, step=step, levels=levels)
                sampled_error = partial(_read_error, lo=lo_t.unsqueeze(1), step=step.unsqueeze(1), levels=levels)
                for c, sign in ((ZERO, 0.0), (ALL_POSITIVE, 1.0), (ALL_NEGATIVE, -1.0)):
                    reads = (sign * column_sums[:, :, t]).unsqueeze(0).expand(self.z, -1, -1)  # [Z, K, out]
                    e = ((known_error(reads) * k_weight).sum(1) * z_weight.view(-1, 1)).double()  # [Z, out]
                    exact[c, :, t] = e
                    total[c, :, t] = e * class_counts[c, :, t].view(-1, 1)
                    count[c, :, t] = class_counts[c, :, t]
                for start in range(0, sample.shape[0], self.chunk):
                    reads = self._products(t, sample[start:start + self.chunk, t]).view(
                        self.z, -1, self.k, self.out)
                    e = ((sampled_error(reads) * k_weight.unsqueeze(1)).sum(2) * z_weight).double()  # [Z, c, out]
                    hot = F.one_hot(sample_classes[start:start + self.chunk, t], num).double()  # [c, Z, C]
                    hot[..., :KNOWN] = 0  # the known reads are counted exactly above
                    total[KNOWN:, :, t] += torch.einsum("zco,czk->kzo", e, hot)[KNOWN:]
                    square[KNOWN:, :, t] += torch.einsum("zco,czk->kzo", e.square(), hot)[KNOWN:]
                    count[KNOWN:, :, t] += hot.sum(0).t()[KNOWN:]
            result[a] = {"sum": total, "square": square, "count": count, "exact": exact}
        return result

CONDITIONAL_BINS = 256
# Calibration batches of the fast estimate (wrap_error.py, explore.py --verify): a dynamic range is one
# batch's, and one batch misjudged conv2's ADC error by up to 3x (docs/estimate_analysis.md, section 1).
DEFAULT_CALIB_BATCHES = 4


CALIBRATION_UPSTREAMS = ("ideal", "simulated")


def calibration_upstream(errors: InjectionModel, choice: str | None = None) -> str:
    """The calibration inputs a form is built for (`choice`, when given, wins): the "planes" form applies
    exact errors that depend on each layer's real inputs, so it calibrates on the simulator's own
    activations (ideal cells, the point's ADC); the other forms on the ideal quantized model's, as
    published."""
    if choice is not None:
        if choice not in CALIBRATION_UPSTREAMS:
            raise ValueError(f"calibration upstream must be one of {CALIBRATION_UPSTREAMS}, not {choice!r}")
        return choice
    return "simulated" if errors.adc_form in ("planes", "repeated") else "ideal"


def conditional_error(u: torch.Tensor, error: torch.Tensor, bins: int = CONDITIONAL_BINS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ADC error as a function of the ideal output: per output channel, `bins` equal-width bins
    of u over its sampled range; per bin the mean and the standard deviation of the error.

    (lo [out], width [out], mean [out, bins], std [out, bins]). A deterministic ADC rounds the same
    read the same way on every input, so its error is largely a function of the read: a background
    row that every image repeats gets the same error each time (only the bin mean, no noise), a coarse
    range whose grid misses zero shifts every read alike, reads below half a step lose their signal.
    An empty bin takes the channel's overall mean and deviation."""
    u, error = u.double(), error.double()
    lo, hi = u.amin(0), u.amax(0)
    width = ((hi - lo) / bins).clamp(min=1e-12)
    index = ((u - lo) / width).floor().clamp(0, bins - 1).long()  # [m, out]
    out = u.shape[1]
    flat = (index + torch.arange(out, device=u.device) * bins).reshape(-1)
    count = torch.zeros(out * bins, dtype=torch.float64, device=u.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float64))
    total = torch.zeros_like(count).index_add_(0, flat, error.reshape(-1))
    square = torch.zeros_like(count).index_add_(0, flat, error.square().reshape(-1))
    overall_mean, overall_var = error.mean(0), error.var(0, unbiased=False)
    filled = count > 0
    mean = torch.where(filled, total / count.clamp(min=1), overall_mean.repeat_interleave(bins))
    var = torch.where(filled, square / count.clamp(min=1) - mean.square(), overall_var.repeat_interleave(bins))
    return lo, width, mean.view(out, bins), var.clamp(min=0).sqrt().view(out, bins)


@dataclass
class AdcError:
    """The measured ADC error of one layer at one hardware point."""

    output_power: torch.Tensor  # [out, T] E (sum_{z,k} 2^z 2^(ck) e_{t,z,k})^2 per read row, integer units
    input_power: torch.Tensor  # [T] E ||x_q,t||^2, integer input levels
    # The error as a function of the ideal output (`conditional_error`): (lo, width, mean, std).
    conditional: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # The "planes" form (nipa.estimation.plane_states), integer units before scale_w: the mean error and
    # variance per (class, bit, tile, output) [C, Z, T, out].
    planes: tuple[torch.Tensor, torch.Tensor] | None = None
    # The "repeated" form (nipa.estimation.repeated_rows): (hash weights [2, fan_in], hashes [M, 2], exact
    # errors [M, out], the other rows' output error variance [out]), errors in units of scale_w * level.
    repeated: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def weight_variance(self) -> torch.Tensor:
        """[out, T]: the integer-weight noise variance with the same output error power."""
        variance = self.output_power / self.input_power.clamp(min=1e-12)
        return torch.where(self.input_power > 0, variance, torch.zeros_like(variance))


class AdcCalibration:
    """The ADC error of every mapped layer's real reads, measured on calibration batches through the
    noise-free quantized model (see the module docstring, adc="measured").

    batches: input tensors (or (input, label) pairs); the same batches serve every point. Use the
    evaluation batch size: a dynamic range is the range of one batch. Results are cached per
    (wl_weight, subArray, cellBit, wl_input, ADC mode, ADC bits); `prefetch(points)` lets one pass
    serve every ADC resolution of a (wl_weight, subArray, cellBit, wl_input, mode).
    """

    def __init__(self, model: nn.Module, batches: Iterable, *, exclude: Sequence[str] = (),
                 include: Sequence[str] | None = None, memory_mb: float = 256, sample_rows: int = 2048,
                 seed: int = 0, device_reads: bool = False, upstream: str = "ideal") -> None:
        self.model = model
        self.batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
        if not self.batches:
            raise ValueError("ADC calibration needs at least one input batch")
        self.exclude, self.include = tuple(exclude), include
        self.memory_mb = memory_mb
        self.sample_rows = sample_rows
        self.seed = seed
        # Reads through one programmed chip where the point has device error: a dynamic range spans
        # the device-perturbed reads, so its step (and the ADC error) grows with the variation.
        self.device_reads = device_reads
        if upstream not in CALIBRATION_UPSTREAMS:
            raise ValueError(f"calibration upstream must be 'ideal' or 'simulated', not {upstream!r}")
        self.upstream = upstream
        self._wanted: dict[tuple, set[int]] = {}
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.seconds = 0.0  # total time spent measuring (for honest timing of the fast method)

    @staticmethod
    def key_of(hw: HWConfig, device_reads: bool = False) -> tuple:
        """What the measured reads depend on, ADC bits excepted (with device_reads, the device error)."""
        key = (hw.wl_weight, hw.subArray, hw.cellBit, hw.wl_input, hw.adc_mode)
        if device_reads and hw.has_device_error:
            key += (hw.vari_type, hw.vari, hw.ind_vari, hw.laplace_b, hw.SAF_prop, hw.onoffratio)
        return key

    def pass_key(self, hw: HWConfig) -> tuple:
        """The points one calibration pass serves: every ADC resolution of `key_of`, except on the
        simulator's activations (upstream="simulated"), which depend on the point's own ADC resolution."""
        key = self.key_of(hw, self.device_reads)
        if self.upstream == "simulated" and hw.adc_mode != "calibrated":
            key += (hw.ADCprecision,)
        return key

    def prefetch(self, points: Iterable[HWConfig]) -> None:
        """Measure these points' ADC resolutions together, when the first of them is asked for."""
        for hw in points:
            self._wanted.setdefault(self.pass_key(hw), set()).add(hw.ADCprecision)

    def __contains__(self, hw: HWConfig) -> bool:
        return (*self.key_of(hw, self.device_reads), hw.ADCprecision) in self._cache

    def errors(self, hw: HWConfig, conditional: bool = False, planes: bool = False,
               repeated: bool = False) -> dict[str, AdcError]:
        """Per layer name, the measured ADC error of `hw` (see `AdcError`); conditional: also the error
        as a function of the ideal output (a second sample of rows, adc_form="conditional"); planes: also
        the per-plane-state errors (adc_form="planes"); repeated: also the repeated rows' exact errors
        (adc_form="repeated")."""
        cached = self._cache.get((*self.key_of(hw, self.device_reads), hw.ADCprecision))
        if cached is None or (conditional and any(e.conditional is None for e in cached.values())) or (
                planes and any(e.planes is None for e in cached.values())) or (
                repeated and any(e.repeated is None for e in cached.values())):
            key = self.key_of(hw, self.device_reads)
            bits = sorted(self._wanted.get(self.pass_key(hw), set()) | {hw.ADCprecision})
            started = time.perf_counter()
            for a, noise in self._measure(hw, bits, conditional, planes, repeated).items():
                self._cache[(*key, a)] = noise
            self.seconds += time.perf_counter() - started
        return self._cache[(*self.key_of(hw, self.device_reads), hw.ADCprecision)]

    @torch.no_grad()
    def _run(self, hw: HWConfig, visit) -> None:
        """Feed every calibration batch through the noise-free quantized model; `visit(batch_index,
        name, layer, reads)` sees each mapped layer's reads."""
        ideal = inject(self.model, hw, exclude=self.exclude, include=self.include,
                       errors=InjectionModel(device="cells", adc="none"))
        for layer in injected_layers(ideal):  # no device error either: the ideal reads
            layer.core.cells = False
            layer.redraw(0, 0)
        layers = {layer.core.name: layer for layer in injected_layers(ideal)}
        captured: dict[str, torch.Tensor] = {}
        feeder, sources = ideal, layers
        if self.upstream == "simulated" and hw.adc_mode != "calibrated":
            # Each layer's inputs as the simulator (ideal cells, the point's ADC) makes them: a coarse
            # ADC's offsets upstream move the ranges, scales and zero patches of the layers below.
            from nipa.simulator.crossbar import convert

            clean = dataclasses.replace(hw, vari=0.0, ind_vari=0.0, laplace_b=0.0, SAF_prop=0.0)
            feeder = convert(self.model, clean, exclude=self.exclude, include=self.include,
                             memory_mb=self.memory_mb)
            sources = {name: (feeder if name == "" else feeder.get_submodule(name)) for name in layers}
        hooks = [module.register_forward_pre_hook(
            lambda _m, args, name=name: captured.__setitem__(name, args[0].detach()))
            for name, module in sources.items()]
        # The row sample is seeded per key: the same points always get the same calibration.
        key = self.key_of(hw, self.device_reads)
        generator = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, key)).encode()))
        cells: dict[str, torch.Tensor] = {}
        try:
            feeder.eval()
            device = next(iter(layers.values())).weight.device
            for index, batch in enumerate(self.batches):
                captured.clear()
                feeder(batch.to(device))
                for name, x in captured.items():
                    layer = layers[name]
                    scale_in = quantize_input(x.float(), hw.wl_input)[1]
                    if name not in cells and self.device_reads and hw.has_device_error:
                        # A calibration chip of its own stream (neither a prediction's nor the simulator's).
                        chip = chip_generator(self.seed, 0, zlib.crc32(f"calibrate:{name}".encode()))
                        cells[name] = program_pairs(layer.core.slices.float(), hw, chip)
                    reads = _Reads(_layer_rows(layer, x), scale_in, layer.core, self.memory_mb,
                                   self.sample_rows, generator, cells.get(name))
                    visit(index, name, layer, reads)
        finally:
            for hook in hooks:
                hook.remove()

    def _measure(self, hw: HWConfig, bits: list[int], conditional: bool = False, planes: bool = False,
                 repeated: bool = False) -> dict[int, dict[str, AdcError]]:
        fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if hw.adc_mode == "calibrated":
            # One fixed range per slice, over every tile, input bit and batch (as calibrate_adc).
            def collect(_i, name, _layer, reads):
                lo, hi = reads.bounds()
                lo, hi = lo.amin(dim=(0, 1)), hi.amax(dim=(0, 1))
                if name in fixed:
                    lo, hi = torch.minimum(fixed[name][0], lo), torch.maximum(fixed[name][1], hi)
                fixed[name] = (lo, hi)

            self._run(hw, collect)
        sums: dict[str, dict[int, torch.Tensor]] = {}
        input_power: dict[str, torch.Tensor] = {}
        samples: dict[str, list[tuple[torch.Tensor, dict[int, torch.Tensor]]]] = {}
        plane_sums: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        tallies: dict[str, dict[int, RowTally]] = {}
        fan_ins: dict[str, int] = {}

        def measure(_i, name, layer, reads):
            if hw.adc_mode == "dynamic":  # one range over every tile (SPEC section 4, step 6)
                lo, hi = reads.bounds()
                lo, hi = lo.amin(dim=0, keepdim=True).expand_as(lo), hi.amax(dim=0, keepdim=True).expand_as(hi)
            elif hw.adc_mode == "dynamic_tile":
                lo, hi = reads.bounds()
            elif hw.adc_mode == "calibrated":
                shape = (reads.num_tiles, reads.z, reads.k)
                lo, hi = (b.view(1, 1, -1).expand(shape) for b in fixed[name])
            else:  # full: +-S (2^c - 1), S the physical rows of the crossbar
                full = float(hw.subArray * (2**hw.cellBit - 1))
                lo = torch.full((reads.num_tiles, reads.z, reads.k), -full, device=reads.slices.device)
                hi = -lo
            for a, power in reads.error_power(lo, hi, bits, hw.cellBit).items():
                sums.setdefault(name, {}).setdefault(a, torch.zeros_like(power))
                sums[name][a] += power
            if conditional:
                u, errors = reads.joint_errors(lo, hi, bits, hw.cellBit)
                samples.setdefault(name, []).append((u.cpu(), {a: e.cpu() for a, e in errors.items()}))
            if planes:
                tile_rows = tile_row_counts(layer.core.fan_in, layer.core.rows)
                for a, batch_sums in reads.plane_errors(lo, hi, bits, hw.cellBit, tile_rows).items():
                    into = plane_sums.setdefault(name, {}).setdefault(a, {})
                    for field, value in batch_sums.items():
                        into[field] = into.get(field, 0) + value.cpu()
            if repeated:
                fan_ins[name] = layer.core.fan_in
                reads.repeated_rows(name, lo, hi, bits, hw.cellBit,
                                    tallies.setdefault(name, {a: RowTally() for a in bits}))
            input_power[name] = input_power.get(name, 0) + reads.input_power

        self._run(hw, measure)
        result: dict[int, dict[str, AdcError]] = {a: {} for a in bits}
        for name, per_bits in sums.items():
            power_in = (input_power[name] / len(self.batches)).double().cpu()
            for a, power in per_bits.items():
                fit = None
                if conditional:
                    fit = conditional_error(torch.cat([sample[0] for sample in samples[name]]),
                                            torch.cat([sample[1][a] for sample in samples[name]]))
                # Pooled over the batches: a range that changes from batch to batch moves the bins' means,
                # and the pooled deviation holds that spread.
                rows = None
                if repeated:
                    _, hashes, exact, rest = tallies[name][a].select(hw.adc_mode in ("calibrated", "full"))
                    rows = (hash_weights(name, fan_ins[name], max_level(hw.wl_input)), hashes, exact, rest.float())
                result[a][name] = AdcError(output_power=(power / len(self.batches)).cpu(), input_power=power_in,
                                           conditional=fit,
                                           planes=_plane_tables(plane_sums[name][a], len(self.batches))
                                           if planes else None, repeated=rows)
        return result


def _read_error(reads: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """ADC(P) - P for reads P with the range lo and step = (hi - lo) / levels broadcastable to them (the
    simulator's rule). A constant read (step 0) equals lo: index 0 gives it back, error 0."""
    divisor = torch.where(step > 0, step, torch.ones_like(step))
    index = (reads - lo).div_(divisor).round_().clamp_(0, levels)
    return index.mul_(step).add_(lo).sub_(reads)


def _plane_tables(sums: dict[str, torch.Tensor], batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) [C, Z, T, out] per plane class from the summed `_Reads.plane_errors` of the
    calibration batches. A known read's mean weights each batch's exact error by its rows in that class
    (the plain mean over batches where no row had it) and has no variance; a mixed class that never
    occurred errs by 0."""
    count = sums["count"].unsqueeze(-1)  # [C, Z, T, 1]
    mean = sums["sum"] / count.clamp(min=1)
    mean[:KNOWN] = torch.where(count[:KNOWN] > 0, mean[:KNOWN], sums["exact"] / batches)
    var = (sums["square"] / count.clamp(min=1) - mean.square()).clamp(min=0)
    var[:KNOWN] = 0
    return mean.float(), var.float()


# ----------------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------------


def _formula_terms(stats: ModelStats | ComboStats, hw: HWConfig, names: Sequence[str],
                   tile_factor: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer (ADC_k, sigma_dev,k^2 A_k) [K] from the layers' own statistics (nipa.estimation.metric)."""
    terms = layer_slice_noise(stats, hw, tile_factor=tile_factor)
    stat_layers = list(stats.layers)
    missing = [n for n in names if n not in stat_layers]
    if missing:
        raise KeyError(f"the bit statistics lack mapped layer(s) {missing}; they hold {stat_layers}. "
                       "Recompute them with stat.py and the same --exclude_layer/--include_layer")
    return {n: (terms["adc"][stat_layers.index(n)], terms["device"][stat_layers.index(n)]) for n in names}


def inject(
    model: nn.Module,
    hw: HWConfig,
    *,
    exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
    seed: int = 0,
    draw: int = 0,
    stats: ModelStats | ComboStats | None = None,
    method: str = "published",
    device: str | None = None,
    adc: str | None = None,
    adc_form: str | None = None,
    tile_factor: str = "tiles",
    calibration: AdcCalibration | None = None,
    errors: InjectionModel | None = None,
    paired: bool = False,
) -> nn.Module:
    """A copy of `model` whose mapped layers carry draw `draw` of `hw`'s equivalent weight error.

    method: "published" (SPEC section 7: formula device and ADC terms) or "calibrated" (cell-model
    device errors, measured ADC error as output noise); `device` / `adc` / `adc_form` override a part,
    `errors` replaces them all (see the module docstring). stats: bit statistics holding `hw`'s
    combination (computed from the weights when None and a formula term needs them). calibration:
    required by adc="measured" (`AdcCalibration`). paired: cells of draw d = the simulator's chip d
    (diagnostic, see `InjectedCore.effective_weight`). The input model is left untouched.
    """
    errors = errors or InjectionModel.of(method, device, adc, tile_factor, adc_form)
    if is_mappable(model):  # a bare layer converts to its injected twin
        names = [""]
        converted = copy.deepcopy(model)
        modules = {"": converted}
    else:
        names = select_layers(model, exclude=exclude, include=include)
        converted = copy.deepcopy(model)
        modules = {name: converted.get_submodule(name) for name in names}
    noise, measured = _noise_variances(model, hw, errors, names, exclude, include, stats, calibration)
    for name in names:
        layer = as_linear(modules[name])  # a transformers Conv1D becomes its nn.Linear twin
        core = InjectedCore(layer.weight, hw, name, noise[name], cells=errors.device == "cells",
                            **measured.get(name, {}))
        cls = InjectedLinear if isinstance(layer, nn.Linear) else InjectedConv2d
        injected = cls(layer, core).to(layer.weight.device)
        injected.paired = paired
        if name:
            set_submodule(converted, name, injected)
        else:
            converted = injected
    redraw(converted, seed, draw)
    return converted


def _noise_variances(model: nn.Module, hw: HWConfig, errors: InjectionModel, names: list[str],
                     exclude: Sequence[str], include: Sequence[str] | None,
                     stats: ModelStats | ComboStats | None,
                     calibration: AdcCalibration | None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Per layer, the variance added to every integer weight level, broadcastable to [out, T], and
    the measured ADC error as InjectedCore's keyword arguments: (adc_form="output") the output error
    power [out, T]; (adc_form="conditional") the error's mean and deviation per bin of the ideal output."""
    noise = {name: torch.zeros(1, 1, dtype=torch.float64) for name in names}
    formula_device = errors.device == "formula" and hw.has_device_error
    if formula_device or errors.adc == "formula":
        if stats is None:
            if names == [""]:
                raise ValueError("a bare layer needs its statistics passed as stats=")
            stats = model_statistics(model, [(hw.wl_weight, hw.subArray, hw.cellBit)], exclude, include)
        significance = slice_significance(hw.num_slices, hw.cellBit, dtype=torch.float64) ** 2  # 4^(ck)
        for name, (adc_term, device_term) in _formula_terms(stats, hw, names, errors.tile_factor).items():
            per_slice = torch.zeros(hw.num_slices, dtype=torch.float64)
            if errors.adc == "formula":
                per_slice += torch.as_tensor(adc_term, dtype=torch.float64)
            if formula_device:
                per_slice += torch.as_tensor(device_term, dtype=torch.float64)
            # Independent Gaussians on the slices recombine into one per weight: sum_k 4^(ck) v_k.
            noise[name] = noise[name] + (per_slice * significance).sum()
    if errors.adc == "measured":
        if calibration is None:
            raise ValueError("adc='measured' needs calibration=AdcCalibration(model, batches)")
        measured = calibration.errors(hw, conditional=errors.adc_form == "conditional",
                                      planes=errors.adc_form == "planes", repeated=errors.adc_form == "repeated")
        if errors.adc_form == "output":
            return noise, {name: {"output_power": measured[name].output_power} for name in names}
        if errors.adc_form == "conditional":
            return noise, {name: {"conditional": measured[name].conditional} for name in names}
        if errors.adc_form == "planes":
            return noise, {name: {"planes": measured[name].planes} for name in names}
        if errors.adc_form == "repeated":
            return noise, {name: {"repeated": measured[name].repeated} for name in names}
        for name in names:
            noise[name] = noise[name] + measured[name].weight_variance()
    return noise, {}
