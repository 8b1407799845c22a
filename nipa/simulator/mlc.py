"""One-to-one MLC PIM chip: every weight on one multi-level cell pair (SPEC section 9).

With c bits per cell and wl_weight = c + 1, a weight needs a single slice (K = 1): it is quantized
symmetrically per output channel to an integer level q in [-(2^c - 1), 2^c - 1], and |q| is written to
the positive cell (q > 0) or the negative cell (q < 0) of a differential pair; the other cell stays at
G_min. Programming uses the project's one cell model (`nipa.hardware.device_errors`): the conductance G(d) =
d + g0 of each cell is perturbed once per chip by `perturb_conductance`, from the random stream
`chip_generator(seed, chip, crc32(layer name))`, so the same seed gives the same chip and every method
sees the same chips. The array then computes with the effective weight scale * (G_pos - G_neg).

What is digital and may be fine-tuned without touching the cells (mode "digital"): the per-column
gain and offset applied after the array (initialised to 1 and 0), the layer bias, and everything
outside the mapped layers (batch-norm, layers kept digital). Mode "cells" also trains the cell targets:
a float shadow level per weight whose rounded value is the target; the forward pass uses the
programmed conductances and the gradient reaches the shadow straight through (d read / d shadow = 1).
`reprogram()` rewrites the cells whose target changed, each with a fresh programming-variation draw,
and counts them as writes; cells whose target did not change keep their programmed state.

Optional non-idealities, all off by default (the one-to-one chip's error is then programming variation
and stuck-at faults only): per-tensor input quantization (`input_bits`), per-read conductance noise
(`read_noise`, relative, redrawn for every batch), and an ADC (`adc_bits`) that quantizes the partial
sum of every `adc_rows` crossbar rows over a per-layer full-scale range calibrated on data.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nipa.hardware.config import HWConfig
from nipa.hardware.device_errors import chip_generator, leak_level, perturb_conductance
from nipa.hardware.mapping import is_mappable, select_layers, set_submodule
from nipa.hardware.quant import max_level, quantize_input, quantize_weight_tiles
from nipa.simulator.crossbar import im2col

# Re-programming round r of a layer draws from chip_generator(seed, chip, crc + r * _ROUND): a stream
# independent of the first programming (r = 0) and of every other layer.
_ROUND = 2**32


def mlc_hw(cell_bits: int, vari_type: str = "state_dependent", spread: float = 0.0, SAF_prop: float = 0.0,
           onoffratio: float = 1e8) -> HWConfig:
    """The hardware point of a one-to-one MLC chip: wl_weight = cell_bits + 1 (one slice), the spread
    given to the parameter of `vari_type` (vari, ind_vari or laplace_b)."""
    spreads = {"state_dependent": "vari", "state_independent": "ind_vari", "laplace": "laplace_b"}
    if vari_type not in spreads:
        raise ValueError(f"vari_type {vari_type!r}: expected one of {', '.join(spreads)}")
    return HWConfig(wl_weight=cell_bits + 1, cellBit=cell_bits, vari_type=vari_type,
                    onoffratio=onoffratio, SAF_prop=SAF_prop, **{spreads[vari_type]: spread})


@dataclass(frozen=True)
class ChipOptions:
    """Non-idealities beyond programming error; all off by default."""

    input_bits: int | None = None  # per-tensor symmetric input quantization (bits incl. sign)
    read_noise: float = 0.0  # relative per-read noise on every cell: G * (1 + N(0, read_noise))
    adc_bits: int | None = None  # ADC on the partial sum of every `adc_rows` rows
    adc_rows: int = 128


def program_cells(levels: torch.Tensor, hw: HWConfig, generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed levels -> programmed (G_pos, G_neg) in level units, through the shared cell model.

    Draws in the order `device_errors.program_pairs` does, so G_pos - G_neg equals its result for the
    same generator state. Without device error the pair reads the levels exactly (no leak).
    """
    positive, negative = levels.clamp(min=0), (-levels).clamp(min=0)
    if not hw.has_device_error or generator is None:
        return positive, negative
    g0 = leak_level(hw.cellBit, hw.onoffratio)
    return perturb_conductance(positive + g0, hw, generator), perturb_conductance(negative + g0, hw, generator)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _quantize_ste(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor fake quantization with a straight-through gradient."""
    x_q, scale = quantize_input(x.detach(), bits)
    return x + (x_q * scale - x).detach()


class MLCLayer(nn.Module):
    """A Conv2d (groups 1) or Linear layer mapped one-to-one onto MLC cell pairs."""

    def __init__(self, layer: nn.Module, hw: HWConfig, name: str = "", options: ChipOptions | None = None) -> None:
        super().__init__()
        if hw.num_slices != 1:
            raise ValueError(f"{name}: one-to-one mapping needs wl_weight = cellBit + 1, got "
                             f"wl_weight={hw.wl_weight}, cellBit={hw.cellBit}")
        if not is_mappable(layer):
            raise ValueError(f"{name}: {type(layer).__name__} is not a mappable layer")
        self.hw, self.name, self.options = hw, name, options or ChipOptions()
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"{name}: only numeric zero padding is supported")
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.kernel_size = layer.kernel_size
        self.weight_shape = tuple(layer.weight.shape)
        matrix = layer.weight.detach().reshape(self.weight_shape[0], 1, -1).float()
        q, scale = quantize_weight_tiles(matrix, hw.wl_weight)  # one tile = the whole fan-in
        self.max_level = max_level(hw.wl_weight)
        self.register_buffer("levels", q[:, 0])  # programmed targets [out, fan_in], integer-valued
        self.register_buffer("weight_scale", scale[:, 0])  # [out]
        g_pos, g_neg = program_cells(self.levels, hw, None)
        self.register_buffer("g_pos", g_pos)
        self.register_buffer("g_neg", g_neg)
        self.register_buffer("adc_scale", torch.tensor(float("nan")))  # full scale, set by calibrate_adc
        device = layer.weight.device
        self.col_gain = nn.Parameter(torch.ones(self.weight_shape[0], device=device))
        self.col_offset = nn.Parameter(torch.zeros(self.weight_shape[0], device=device))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        # Cell targets as floats; trainable only in mode "cells" (see set_trainable).
        self.shadow = nn.Parameter(self.levels.clone(), requires_grad=False)
        self.seed, self.chip, self.rounds, self.writes = 0, 0, 0, 0
        self.read_generator: torch.Generator | None = None
        self.adc_calibrating = False

    @property
    def num_cells(self) -> int:
        return 2 * self.levels.numel()

    def _generator(self, round_index: int) -> torch.Generator:
        return chip_generator(self.seed, self.chip, zlib.crc32(self.name.encode()) + round_index * _ROUND)

    @torch.no_grad()
    def program(self, seed: int, chip: int) -> None:
        """Program the current targets as chip `chip` of `seed` (a fixed draw of device error)."""
        self.seed, self.chip, self.rounds, self.writes = seed, chip, 0, 0
        g_pos, g_neg = program_cells(self.levels.cpu(), self.hw, self._generator(0))
        self.g_pos.copy_(g_pos)
        self.g_neg.copy_(g_neg)
        self.shadow.copy_(self.levels)
        # The read-noise stream restarts with every programming; its generator is made at the first read,
        # on the device the cells are on then (see read()).
        self.read_generator = None

    @torch.no_grad()
    def reprogram(self) -> int:
        """Write the rounded shadow levels; only cells whose target changed are rewritten, each with a
        fresh variation draw. Returns the number of cells written (also added to `self.writes`)."""
        new = self.shadow.clamp(-self.max_level, self.max_level).round()
        changed_pos = new.clamp(min=0) != self.levels.clamp(min=0)
        changed_neg = (-new).clamp(min=0) != (-self.levels).clamp(min=0)
        count = int(changed_pos.sum() + changed_neg.sum())
        if count:
            self.rounds += 1
            g_pos, g_neg = program_cells(new.cpu(), self.hw, self._generator(self.rounds))
            self.g_pos.copy_(torch.where(changed_pos, g_pos.to(self.g_pos.device), self.g_pos))
            self.g_neg.copy_(torch.where(changed_neg, g_neg.to(self.g_neg.device), self.g_neg))
            self.levels.copy_(new)
            self.writes += count
        # Keep the shadow inside the representable range so it cannot drift away from the rounding.
        self.shadow.clamp_(-self.max_level - 0.5, self.max_level + 0.5)
        return count

    def read(self) -> torch.Tensor:
        """The differential read G_pos - G_neg in level units [out, fan_in], with optional read noise;
        in mode "cells" the gradient passes straight through to the shadow levels."""
        g_pos, g_neg = self.g_pos, self.g_neg
        if self.options.read_noise > 0:
            if self.read_generator is None or self.read_generator.device != g_pos.device:
                # Bound to the cells' current device, not the one of conversion: a layer moved by .to()
                # keeps drawing (a new device restarts the stream: CPU and CUDA streams differ anyway).
                self.read_generator = chip_generator(self.seed, self.chip,
                                                     zlib.crc32(self.name.encode()) + _ROUND - 1, g_pos.device)
            generator = self.read_generator
            noise = torch.randn((2, *g_pos.shape), generator=generator, device=g_pos.device)
            g_pos = g_pos * (1 + self.options.read_noise * noise[0])
            g_neg = g_neg * (1 + self.options.read_noise * noise[1])
        read = g_pos - g_neg
        if self.shadow.requires_grad:
            read = read + (self.shadow - self.shadow.detach())
        return read

    def effective_weight(self) -> torch.Tensor:
        """The weight the chip computes with, in the original layer's shape."""
        return (self.weight_scale[:, None] * self.read()).reshape(self.weight_shape)

    def _matmul_with_adc(self, x: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """x [n, fan_in] @ read^T with one ADC conversion per `adc_rows` rows (level units)."""
        rows = self.options.adc_rows
        fan_in = read.shape[1]
        pad = (-fan_in) % rows
        x_t = F.pad(x, (0, pad)).reshape(x.shape[0], -1, rows)
        w_t = F.pad(read, (0, pad)).reshape(read.shape[0], -1, rows)
        partial = torch.einsum("ntr,otr->nto", x_t, w_t)
        if self.adc_calibrating:
            observed = partial.detach().abs().amax()
            self.adc_scale = torch.fmax(self.adc_scale, observed)
            return partial.sum(1)
        if torch.isnan(self.adc_scale):
            raise RuntimeError(f"layer {self.name}: the ADC needs calibrate_adc(model, batches) first")
        half = 2 ** (self.options.adc_bits - 1)
        step = self.adc_scale / half
        codes = _round_ste(partial / step).clamp(-half, half - 1)
        return (codes * step).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.input_bits is not None:
            x = _quantize_ste(x, self.options.input_bits)
        if self.options.adc_bits is None:
            weight = self.effective_weight()
            y = (F.conv2d(x, weight, None, self.stride, self.padding, self.dilation) if self.is_conv
                 else F.linear(x, weight))
            shape = (1, -1, 1, 1) if self.is_conv else (1, -1)
        else:
            y, shape = self._forward_adc(x)
        y = y * self.col_gain.view(shape) + self.col_offset.view(shape)
        return y if self.bias is None else y + self.bias.view(shape)

    def _forward_adc(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        read = self.read()
        scale = self.weight_scale
        if not self.is_conv:
            flat = x.reshape(-1, x.shape[-1])
            y = self._matmul_with_adc(flat, read) * scale
            return y.reshape(*x.shape[:-1], -1), (1, -1)
        pad_h, pad_w = self.padding
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        cols = im2col(padded, self.kernel_size, self.stride, self.dilation)  # [N, L, fan_in]
        n, positions = cols.shape[:2]
        out_h = (padded.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        y = self._matmul_with_adc(cols.reshape(n * positions, -1), read) * scale
        y = y.view(n, positions, -1).transpose(1, 2).reshape(n, -1, out_h, positions // out_h)
        return y, (1, -1, 1, 1)


def convert_mlc(model: nn.Module, hw: HWConfig, *, exclude: Sequence[str] = (),
                include: Sequence[str] | None = None, options: ChipOptions | None = None,
                seed: int = 0, chip: int = 0) -> nn.Module:
    """A copy of `model` whose mapped layers (`nipa.hardware.mapping.select_layers`) are one-to-one MLC layers,
    programmed as chip `chip` of `seed`. The input model is left untouched."""
    converted = copy.deepcopy(model)
    for name in select_layers(model, exclude=exclude, include=include):
        set_submodule(converted, name, MLCLayer(converted.get_submodule(name), hw, name, options))
    program_chip(converted, seed, chip)
    return converted


def mlc_layers(model: nn.Module) -> dict[str, MLCLayer]:
    """The mapped layers of a converted model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MLCLayer)}


def program_chip(model: nn.Module, seed: int, chip: int) -> None:
    """Program every mapped layer as chip `chip` of `seed`."""
    for layer in mlc_layers(model).values():
        layer.program(seed, chip)


def reprogram_chip(model: nn.Module) -> int:
    """Rewrite every changed cell target (mode "cells"); returns the cells written."""
    return sum(layer.reprogram() for layer in mlc_layers(model).values())


def chip_writes(model: nn.Module) -> int:
    """Cells re-written since the chip was first programmed."""
    return sum(layer.writes for layer in mlc_layers(model).values())


def chip_cells(model: nn.Module) -> int:
    """Cells the chip uses (two per mapped weight)."""
    return sum(layer.num_cells for layer in mlc_layers(model).values())


TRAINABLE_MODES = ("none", "digital", "cells")


def set_trainable(model: nn.Module, mode: str) -> list[str]:
    """Make exactly the parameters of `mode` trainable and return their names.

    none: nothing; digital: every parameter except the cell shadow levels (column gain and offset,
    biases, batch-norm, layers kept digital); cells: digital plus the shadow levels.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable mode {mode!r}: expected one of {', '.join(TRAINABLE_MODES)}")
    names = []
    for name, param in model.named_parameters():
        is_cell = name == "shadow" or name.endswith(".shadow")
        param.requires_grad_(mode == "cells" or (mode == "digital" and not is_cell))
        if param.requires_grad:
            names.append(name)
    if mode == "cells":  # the shadow starts from the programmed targets
        with torch.no_grad():
            for layer in mlc_layers(model).values():
                layer.shadow.copy_(layer.levels)
    return names


@torch.no_grad()
def calibrate_adc(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Set each ADC's full scale to the largest partial sum seen on the given input batches."""
    layers = [m for m in mlc_layers(model).values() if m.options.adc_bits is not None]
    for layer in layers:
        layer.adc_scale = torch.full_like(layer.adc_scale, float("nan"))
        layer.adc_calibrating = True
    was_training = model.training
    model.eval()
    try:
        for inputs in batches:
            model(inputs)
    finally:
        model.train(was_training)
        for layer in layers:
            layer.adc_calibrating = False
