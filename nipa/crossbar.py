"""Crossbar layers: the bit-and-crossbar slicing simulator, our ground truth (SPEC section 4).

`convert(model, hw)` returns a copy of a model whose mapped layers (see `nipa.mapping`) compute as an
analog PIM chip would: per-(channel, tile) weight quantization, sign-magnitude slices on differential
cell pairs with device errors, bit-serial inputs, one ADC read per (tile, input bit, slice) column,
shift-and-add in digital.

Speed: the original ran one small product per (input bit, slice, tile) in Python loops. Here every
tile of a layer is one batch entry of a single `bmm`, the input bits are stacked along its rows and the
slices along its columns, so one layer is one product (or a few, when the partial sums would exceed
the memory budget). Nothing forces a device synchronization.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nipa.config import HWConfig
from nipa.device_errors import chip_generator, program_pairs
from nipa.mapping import is_mappable, select_layers, set_submodule
from nipa.quant import (
    input_scale,
    max_level,
    quantize_weight_tiles,
    slice_magnitude,
    tile_columns,
)

DEFAULT_MEMORY_MB = 256


class CrossbarCore(nn.Module):
    """One weight matrix W [out, fan_in] programmed on crossbar tiles of `hw.subArray` rows."""

    def __init__(self, weight: torch.Tensor, hw: HWConfig, name: str = "", per_read: bool = False,
                 memory_mb: float = DEFAULT_MEMORY_MB) -> None:
        super().__init__()
        self.hw = hw
        self.name = name
        self.per_read = per_read
        self.memory_mb = memory_mb
        matrix = weight.detach().reshape(weight.shape[0], -1).float()
        self.out_features, self.fan_in = matrix.shape
        self.rows = hw.subArray
        self.num_tiles = math.ceil(self.fan_in / self.rows)
        self.num_slices = hw.num_slices
        q, scale = quantize_weight_tiles(tile_columns(matrix, self.rows), hw.wl_weight)
        self.register_buffer("weight_scale", scale)  # [out, T]
        self.register_buffer("slices", slice_magnitude(q, hw.wl_weight, hw.cellBit))  # [K, out, T, rows]
        self.register_buffer("conductance", self._as_columns(self.slices))  # [T, rows, K*out]
        significance = [[2.0 ** z * 2.0 ** (hw.cellBit * k) for k in range(self.num_slices)]
                        for z in range(hw.wl_input - 1)]
        self.register_buffer("significance", torch.tensor(significance))  # [Z, K]
        # ADC range for the `calibrated` mode, per slice: [K, 2] (min, max); NaN until calibrated.
        self.register_buffer("adc_range", torch.full((self.num_slices, 2), float("nan")))
        self.calibrating = False
        self.calibrated = False
        self.read_generator: torch.Generator | None = None

    @staticmethod
    def _as_columns(pairs: torch.Tensor) -> torch.Tensor:
        """[..., K, out, T, rows] -> [..., T, rows, K*out]: the right operand of the tile product."""
        k, out, t, rows = pairs.shape[-4:]
        lead = pairs.shape[:-4]
        moved = pairs.movedim(-2, -4).movedim(-1, -3)  # [..., T, rows, K, out]
        return moved.reshape(*lead, t, rows, k * out)

    def program(self, seed: int, chip: int) -> None:
        """Draw this layer's device errors for one chip (fixed until the next call)."""
        generator = chip_generator(seed, chip, zlib.crc32(self.name.encode()))
        if self.per_read:
            # Errors are redrawn on every read from this stream; the stored pairs stay ideal.
            device = self.slices.device
            self.read_generator = chip_generator(seed, chip, zlib.crc32(self.name.encode()), device)
            self.conductance = self._as_columns(self.slices)
            return
        pairs = program_pairs(self.slices.cpu(), self.hw, generator).to(self.slices.device)
        self.conductance = self._as_columns(pairs)

    # ---- the analog product -------------------------------------------------------------------

    def _adc(self, partial: torch.Tensor) -> torch.Tensor:
        """Quantize partial sums [t, z, n, K, out] to the ADC's levels, in place."""
        hw = self.hw
        if self.calibrating:
            lo = partial.amin(dim=(0, 1, 2, 4))
            hi = partial.amax(dim=(0, 1, 2, 4))
            current = self.adc_range
            self.adc_range = torch.stack([torch.fmin(current[:, 0], lo), torch.fmax(current[:, 1], hi)], 1)
            return partial  # calibration passes ideal partial sums downstream
        levels = 2**hw.ADCprecision
        if hw.adc_mode == "dynamic":
            # The original: the range of each (tile, bit, slice) read over the batch and columns.
            lo = partial.amin(dim=(2, 4), keepdim=True)
            hi = partial.amax(dim=(2, 4), keepdim=True)
        elif hw.adc_mode == "calibrated":
            lo = self.adc_range[:, 0].view(1, 1, 1, -1, 1)
            hi = self.adc_range[:, 1].view(1, 1, 1, -1, 1)
        else:  # full scale of a column: every row at the top level, inputs of either sign
            full = self.rows * (2**hw.cellBit - 1)
            lo = partial.new_tensor(-full)
            hi = partial.new_tensor(full)
        step = (hi - lo) / levels
        safe_step = torch.where(step > 0, step, torch.ones_like(step))
        index = partial.sub(lo).div_(safe_step).round_().clamp_(0, levels)
        return torch.where(step > 0, index.mul_(safe_step).add_(lo), partial)

    def _chunking(self, n: int) -> tuple[int, int, int]:
        """Tiles, bits and rows per product so that the partial sums stay within the memory budget."""
        budget = max(1, int(self.memory_mb * 2**20 / 4 / 3))  # float32, ~3 live copies in the ADC
        per_row = self.num_slices * self.out_features
        bits = self.hw.wl_input - 1
        row_chunk = max(1, min(n, budget // per_row))
        bit_chunk = max(1, min(bits, budget // (per_row * row_chunk)))
        tile_chunk = max(1, min(self.num_tiles, budget // (per_row * row_chunk * bit_chunk)))
        return tile_chunk, bit_chunk, row_chunk

    def _partial_sums(self, magnitude: torch.Tensor, sign: torch.Tensor, tiles: slice, bits: range,
                      rows: slice) -> torch.Tensor:
        """P[t, z, n, k, out] = sum_r x_z[n, t, r] * (G_pos - G_neg)[k, out, t, r]."""
        mag = magnitude[rows, tiles]  # [n, t, S]
        sgn = sign[rows, tiles]
        planes = torch.stack([((mag >> z) & 1).to(sgn.dtype) * sgn for z in bits])  # [z, n, t, S]
        z, n, t, s = planes.shape
        if self.per_read:
            # Fresh device error for every read: one draw per (input bit, tile chunk).
            pairs = program_pairs(self.slices[:, :, tiles].unsqueeze(0).expand(z, -1, -1, -1, -1),
                                  self.hw, self.read_generator)
            columns = self._as_columns(pairs).transpose(0, 1)  # [t, z, S, K*out]
            partial = torch.matmul(planes.permute(2, 0, 1, 3), columns)  # [t, z, n, K*out]
        else:
            left = planes.permute(2, 0, 1, 3).reshape(t, z * n, s)
            partial = torch.bmm(left, self.conductance[tiles])  # [t, z*n, K*out]
        return partial.view(t, z, n, self.num_slices, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, fan_in] -> y [n, out] as the chip computes it (bias not included)."""
        hw = self.hw
        x = x.float()
        scale_in = input_scale(x, hw.wl_input)
        levels = max_level(hw.wl_input)
        x_q = torch.clamp(torch.round(x / scale_in), -levels, levels)
        x_tiles = tile_columns(x_q, self.rows)  # [n, T, S]
        magnitude = x_tiles.abs().to(torch.int32)
        sign = torch.sign(x_tiles)
        if hw.adc_mode == "calibrated" and not (self.calibrated or self.calibrating):
            raise RuntimeError(f"layer {self.name}: ADC mode 'calibrated' needs calibrate_adc(model, batches) "
                               "before the first evaluation")
        n = x.shape[0]
        tile_chunk, bit_chunk, row_chunk = self._chunking(n)
        num_bits = hw.wl_input - 1
        if (hw.adc_mode == "dynamic" and row_chunk < n and not self.calibrating):
            return self._forward_two_pass(magnitude, sign, scale_in, tile_chunk, bit_chunk, row_chunk)
        out = x.new_zeros(n, self.out_features)
        for r0 in range(0, n, row_chunk):
            rows = slice(r0, r0 + row_chunk)
            for t0 in range(0, self.num_tiles, tile_chunk):
                tiles = slice(t0, t0 + tile_chunk)
                for z0 in range(0, num_bits, bit_chunk):
                    bits = range(z0, min(num_bits, z0 + bit_chunk))
                    read = self._adc(self._partial_sums(magnitude, sign, tiles, bits, rows))
                    out[rows] += self._shift_add(read, tiles, bits)
        return out * scale_in

    def _shift_add(self, read: torch.Tensor, tiles: slice, bits: range) -> torch.Tensor:
        """sum_t scale_w[:, t] sum_z 2^z sum_k 2^(ck) ADC(P) -> [n, out]."""
        weights = self.significance[bits.start:bits.stop]  # [z, K]
        per_tile = torch.einsum("tznko,zk->tno", read, weights)
        return torch.einsum("tno,ot->no", per_tile, self.weight_scale[:, tiles])

    def _forward_two_pass(self, magnitude, sign, scale_in, tile_chunk, bit_chunk, row_chunk):
        """Dynamic ADC range over the whole batch while the rows are processed in chunks: the first
        pass finds each read's range, the second quantizes with it (same result as one big pass)."""
        if self.per_read:
            raise NotImplementedError("per-read device error with batch chunking in dynamic ADC mode: "
                                      "raise --memory_mb or lower --batch_size")
        n = magnitude.shape[0]
        num_bits = self.hw.wl_input - 1
        out = magnitude.new_zeros(n, self.out_features, dtype=torch.float32)
        levels = 2**self.hw.ADCprecision
        for t0 in range(0, self.num_tiles, tile_chunk):
            tiles = slice(t0, t0 + tile_chunk)
            for z0 in range(0, num_bits, bit_chunk):
                bits = range(z0, min(num_bits, z0 + bit_chunk))
                lo = hi = None
                for r0 in range(0, n, row_chunk):
                    partial = self._partial_sums(magnitude, sign, tiles, bits, slice(r0, r0 + row_chunk))
                    chunk_lo = partial.amin(dim=(2, 4), keepdim=True)
                    chunk_hi = partial.amax(dim=(2, 4), keepdim=True)
                    lo = chunk_lo if lo is None else torch.minimum(lo, chunk_lo)
                    hi = chunk_hi if hi is None else torch.maximum(hi, chunk_hi)
                step = (hi - lo) / levels
                safe_step = torch.where(step > 0, step, torch.ones_like(step))
                for r0 in range(0, n, row_chunk):
                    rows = slice(r0, r0 + row_chunk)
                    partial = self._partial_sums(magnitude, sign, tiles, bits, rows)
                    index = partial.sub(lo).div_(safe_step).round_().clamp_(0, levels)
                    read = torch.where(step > 0, index.mul_(safe_step).add_(lo), partial)
                    out[rows] += self._shift_add(read, tiles, bits)
        return out * scale_in


class CrossbarLinear(nn.Module):
    """`nn.Linear` computed on crossbars."""

    def __init__(self, layer: nn.Linear, hw: HWConfig, name: str = "", **core_options) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.core = CrossbarCore(layer.weight, hw, name, **core_options)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.core(x.reshape(-1, self.in_features)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class CrossbarConv2d(nn.Module):
    """`nn.Conv2d` (groups 1) computed on crossbars through im2col."""

    def __init__(self, layer: nn.Conv2d, hw: HWConfig, name: str = "", **core_options) -> None:
        super().__init__()
        if layer.groups != 1:
            raise ValueError(f"{name}: grouped/depthwise convolutions are not mapped to crossbars")
        if layer.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {layer.padding_mode!r} is not supported")
        self.out_channels = layer.out_channels
        self.kernel_size = layer.kernel_size
        self.stride, self.dilation = layer.stride, layer.dilation
        self.padding = _explicit_padding(layer)  # (left, right, top, bottom) for F.pad
        self.core = CrossbarCore(layer.weight, hw, name, **core_options)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding)
        batch = x.shape[0]
        out_h = (x.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (x.shape[3] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        columns = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        rows = columns.transpose(1, 2).reshape(-1, columns.shape[1])  # [N*L, C*kh*kw]
        y = self.core(rows).to(x.dtype).view(batch, out_h * out_w, self.out_channels)
        y = y.transpose(1, 2).reshape(batch, self.out_channels, out_h, out_w)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _explicit_padding(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        pads = []  # 'same' (stride 1): the extra pixel goes right/bottom, as PyTorch does
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    pad_h, pad_w = layer.padding
    return (pad_w, pad_w, pad_h, pad_h)


def convert(
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
    """A copy of `model` whose mapped layers run on crossbars configured by `hw`, programmed as chip
    number `chip` of seed `seed`. The input model is left untouched."""
    options = {"per_read": per_read, "memory_mb": memory_mb}
    if is_mappable(model):  # a bare layer converts to its crossbar twin
        converted = _crossbar_layer(copy.deepcopy(model), hw, "", options)
    else:
        converted = copy.deepcopy(model)
        for name in select_layers(model, exclude=exclude, include=include):
            set_submodule(converted, name, _crossbar_layer(converted.get_submodule(name), hw, name, options))
    program_chip(converted, seed, chip)
    return converted


def _crossbar_layer(layer: nn.Module, hw: HWConfig, name: str, options: dict) -> nn.Module:
    cls = CrossbarLinear if isinstance(layer, nn.Linear) else CrossbarConv2d
    return cls(layer, hw, name, **options).to(layer.weight.device)


def crossbar_cores(model: nn.Module) -> list[CrossbarCore]:
    return [m for m in model.modules() if isinstance(m, CrossbarCore)]


def mapped_layer_names(model: nn.Module) -> list[str]:
    return [m.name for m in crossbar_cores(model)]


def program_chip(model: nn.Module, seed: int, chip: int) -> None:
    """Re-program every crossbar of a converted model as chip `chip` (a fresh draw of device error)."""
    for core in crossbar_cores(model):
        core.program(seed, chip)


@torch.no_grad()
def calibrate_adc(model: nn.Module, batches) -> None:
    """Measure the per-layer, per-slice ADC range for the `calibrated` mode on some input batches
    (the partial sums are passed through unquantized while measuring)."""
    cores = crossbar_cores(model)
    for core in cores:
        core.adc_range = torch.full_like(core.adc_range, float("nan"))
        core.calibrating = True
    try:
        for inputs in batches:
            model(inputs)
    finally:
        for core in cores:
            core.calibrating = False
            core.calibrated = True
