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
from nipa.mapping import as_linear, is_mappable, select_layers, set_submodule
from nipa.quant import (
    input_scale,
    max_level,
    quantize_weight_tiles,
    slice_magnitude,
    tile_columns,
)

DEFAULT_MEMORY_MB = 1024


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable scratch tensor of at least `shape`, shared by all layers (they run one at a time).
    Reusing memory avoids the page faults of a fresh large tensor on every product."""
    key = (name, dtype, str(device))
    size = math.prod(shape)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < size:
        _WORKSPACES.pop(key, None)
        buffer = torch.empty(size, dtype=dtype, device=device)
        _WORKSPACES[key] = buffer
    return buffer[:size].view(shape)


def release_workspaces() -> None:
    """Free the simulator's scratch memory."""
    _WORKSPACES.clear()


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
        self.subarray_rows = hw.subArray
        # A layer whose fan-in is below the crossbar height uses only fan_in rows; the idle rows carry
        # no input, so leaving them out changes no read and saves the padding work.
        self.rows = min(hw.subArray, self.fan_in)
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

    def adc_range_of(self, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ADC range (lo, hi) for partial sums [t, z, n, K, out], broadcastable to [t, z, 1, K, 1]."""
        hw = self.hw
        t, z = partial.shape[:2]
        if hw.adc_mode == "dynamic":
            # The original: the range of each (tile, bit, slice) read over the batch and columns.
            # Reduce the contiguous column axis first: much faster than one strided reduction.
            lo = partial.amin(dim=-1, keepdim=True).amin(dim=2, keepdim=True)
            hi = partial.amax(dim=-1, keepdim=True).amax(dim=2, keepdim=True)
            return lo, hi
        if hw.adc_mode == "calibrated":
            lo = self.adc_range[:, 0].view(1, 1, 1, -1, 1).expand(t, z, 1, -1, 1)
            hi = self.adc_range[:, 1].view(1, 1, 1, -1, 1).expand(t, z, 1, -1, 1)
            return lo, hi
        # full: the physical full scale of a column, every row at the top level, inputs of either sign
        full = partial.new_full((t, z, 1, self.num_slices, 1), float(self.subarray_rows * (2**hw.cellBit - 1)))
        return -full, full

    def adc(self, partial: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """ADC read of partial sums: lo + step * clamp(round((P - lo) / step), 0, 2^a_r),
        step = (hi - lo) / 2^a_r; a read whose range is a single value returns it unchanged."""
        levels = 2**self.hw.ADCprecision
        step = (hi - lo) / levels
        inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        # The same operations, in the same order, as the fast path in _read_shift_add.
        index = (partial - lo).mul_(inverse).round_().clamp_(0, levels)
        return torch.where(step > 0, lo + index * step, partial)

    def _adc(self, partial: torch.Tensor) -> torch.Tensor:
        """One full ADC read of partial sums [t, z, n, K, out] (used by the reference and tests)."""
        if self.calibrating:
            self._record_range(partial)
            return partial
        return self.adc(partial, *self.adc_range_of(partial))

    def _read_shift_add(self, partial: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None,
                        tiles: slice, bits: range) -> torch.Tensor:
        """sum_t scale_w[:, t] sum_z 2^z sum_k 2^(ck) ADC(P_{t,z,k}) -> [n, out]. Overwrites `partial`.

        ADC(P) = lo + step * index, so the sum splits into the indices weighted by 2^z 2^(ck) step
        and a constant per tile. Everything runs in place on the partial sums (fresh large tensors
        cost page faults that dominate on CPU). Without a range (lo is None: calibration) the partial
        sums pass unquantized.
        """
        t, z, n = partial.shape[:3]
        weights = self.significance[bits.start:bits.stop].view(1, z, 1, -1, 1)  # [1, z, 1, K, 1]
        if lo is None:
            coefficient, constant = weights.expand(t, -1, -1, -1, -1), None
        else:
            levels = 2**self.hw.ADCprecision
            step = (hi - lo) / levels
            # A constant read (step 0) has P == lo everywhere: index 0 gives it back exactly.
            inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
            partial.sub_(lo).mul_(inverse).round_()
            if self.hw.adc_mode != "dynamic":  # a dynamic range holds every read by construction
                partial.clamp_(0, levels)
            coefficient = weights * step
            constant = (weights * lo).sum(dim=(1, 3))  # [t, 1, 1]
        per_tile = partial.mul_(coefficient).sum(dim=3).sum(dim=1)  # [t, n, out]
        if constant is not None:
            per_tile += constant
        return torch.einsum("tno,ot->no", per_tile, self.weight_scale[:, tiles])

    def _chunking(self, n: int) -> tuple[int, int, int]:
        """Tiles, bits and rows per product so that the live tensors (partial sums, their ADC indices
        and the input bit planes, float32) stay within the memory budget. Whole rows are kept as long
        as possible: splitting them costs the dynamic ADC a second pass."""
        budget = max(1, int(self.memory_mb * 2**20 / 4))
        per_row = self.num_slices * self.out_features + 2 * self.rows + self.out_features
        bits = self.hw.wl_input - 1
        row_chunk = max(1, min(n, budget // per_row))
        bit_chunk = max(1, min(bits, budget // (per_row * row_chunk)))
        tile_chunk = max(1, min(self.num_tiles, budget // (per_row * row_chunk * bit_chunk)))
        return tile_chunk, bit_chunk, row_chunk

    def _partial_sums(self, magnitude: torch.Tensor, sign: torch.Tensor, tiles: slice, bits: range,
                      rows: slice) -> torch.Tensor:
        """P[t, z, n, k, out] = sum_r x_z[n, t, r] * (G_pos - G_neg)[k, out, t, r]."""
        mag = magnitude[rows, tiles].permute(1, 0, 2)  # [t, n, S]
        sgn = sign[rows, tiles].permute(1, 0, 2)
        t, n, s = mag.shape
        z = len(bits)
        planes = _workspace("planes", (t, z, n, s), sgn.dtype, sgn.device)
        bit_buffer = _workspace("bit", (t, n, s), mag.dtype, mag.device)
        for index, bit in enumerate(bits):
            torch.bitwise_right_shift(mag, bit, out=bit_buffer).bitwise_and_(1)
            torch.mul(bit_buffer, sgn, out=planes[:, index])
        if self.per_read:
            # Fresh device error for every read: one draw per (input bit, tile chunk).
            pairs = program_pairs(self.slices[:, :, tiles].unsqueeze(0).expand(z, -1, -1, -1, -1),
                                  self.hw, self.read_generator)
            columns = self._as_columns(pairs).transpose(0, 1)  # [t, z, S, K*out]
            partial = torch.matmul(planes, columns)  # [t, z, n, K*out]
        else:
            partial = _workspace("partial", (t, z * n, self.num_slices * self.out_features),
                                 planes.dtype, planes.device)
            torch.bmm(planes.view(t, z * n, s), self.conductance[tiles], out=partial)  # [t, z*n, K*out]
        return partial.view(t, z, n, self.num_slices, self.out_features)

    @torch.no_grad()  # rounding at every step: nothing to differentiate, and no graph to keep
    def forward(self, x: torch.Tensor, scale_in: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, fan_in] -> y [n, out] as the chip computes it (bias not included). `scale_in`: the
        per-tensor input scale when x is not the whole layer input (a convolution's im2col rows)."""
        hw = self.hw
        if hw.adc_mode == "calibrated" and not (self.calibrated or self.calibrating):
            raise RuntimeError(f"layer {self.name}: ADC mode 'calibrated' needs "
                               "calibrate_adc(model, batches) before the first evaluation")
        x = x.float()
        if scale_in is None:
            scale_in = input_scale(x, hw.wl_input)
        levels = max_level(hw.wl_input)
        x_tiles = tile_columns(torch.clamp(torch.round(x / scale_in), -levels, levels), self.rows)  # [n, T, S]
        magnitude = x_tiles.abs().to(torch.int32)
        sign = torch.sign(x_tiles)
        del x_tiles
        n = x.shape[0]
        tile_chunk, bit_chunk, row_chunk = self._chunking(n)
        num_bits = hw.wl_input - 1
        # Dynamic ranges span the whole batch: with the rows split, a first pass finds each read's range.
        two_pass = hw.adc_mode == "dynamic" and row_chunk < n and not self.calibrating
        if two_pass and self.per_read:
            raise NotImplementedError("per-read device error with the rows split in dynamic ADC mode: "
                                      "raise --memory_mb or lower --batch_size")
        row_slices = [slice(r0, r0 + row_chunk) for r0 in range(0, n, row_chunk)]
        out = x.new_zeros(n, self.out_features)
        for t0 in range(0, self.num_tiles, tile_chunk):
            tiles = slice(t0, t0 + tile_chunk)
            for z0 in range(0, num_bits, bit_chunk):
                bits = range(z0, min(num_bits, z0 + bit_chunk))
                if two_pass:
                    ranges = [self.adc_range_of(self._partial_sums(magnitude, sign, tiles, bits, rows))
                              for rows in row_slices]
                    lo = torch.stack([r[0] for r in ranges]).amin(dim=0)
                    hi = torch.stack([r[1] for r in ranges]).amax(dim=0)
                for rows in row_slices:
                    partial = self._partial_sums(magnitude, sign, tiles, bits, rows)
                    if self.calibrating:
                        self._record_range(partial)
                        lo = hi = None
                    elif not two_pass:
                        lo, hi = self.adc_range_of(partial)
                    out[rows] += self._read_shift_add(partial, lo, hi, tiles, bits)
        return out * scale_in

    def _record_range(self, partial: torch.Tensor) -> None:
        lo = partial.amin(dim=(0, 1, 2, 4))
        hi = partial.amax(dim=(0, 1, 2, 4))
        current = self.adc_range
        self.adc_range = torch.stack([torch.fmin(current[:, 0], lo), torch.fmax(current[:, 1], hi)], 1)


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
        # Per-tensor input scale of the layer input itself: a strided convolution's im2col rows may skip
        # pixels (a 1x1 stride-2 shortcut sees a quarter of them), and their max-abs would differ.
        scale_in = input_scale(x.float(), self.core.hw.wl_input)
        if any(self.padding):
            x = F.pad(x, self.padding)
        rows = im2col(x, self.kernel_size, self.stride, self.dilation)  # [N, L, C*kh*kw]
        batch, positions = rows.shape[:2]
        out_h = (x.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = positions // out_h
        y = self.core(rows.reshape(batch * positions, -1), scale_in).to(x.dtype)
        y = y.view(batch, positions, self.out_channels)
        y = y.transpose(1, 2).reshape(batch, self.out_channels, out_h, out_w)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def im2col(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] (already padded) -> [N, L, C*kh*kw], fan-in ordered as PyTorch flattens a conv
    weight. Built from strided views: F.unfold is pathologically slow on CPU for few channels."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # [N, C, OH, OW, eh, ew]
    windows = windows[..., ::dh, ::dw]
    batch, channels, out_h, out_w = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(batch, out_h * out_w, channels * kh * kw)


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
        converted = _crossbar_layer(as_linear(copy.deepcopy(model)), hw, "", options)
    else:
        converted = copy.deepcopy(model)
        for name in select_layers(model, exclude=exclude, include=include):
            layer = as_linear(converted.get_submodule(name))  # a transformers Conv1D: its nn.Linear twin
            set_submodule(converted, name, _crossbar_layer(layer, hw, name, options))
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
