"""An independent float64 oracle of the bit-and-crossbar slicing simulation (SPEC section 4).

Written from the SPEC text alone, to check `nipa.simulator.crossbar` against something that shares none of its
code: nothing here imports `nipa.hardware.quant`, `nipa.simulator.crossbar`, `nipa.hardware.device_errors` or
`nipa.simulator.reference`, and
every step (quantization, slicing, bit planes, tiles, ADC, shift and add) is spelled out again in
numpy float64, as plain loops over (tile, input bit, slice). Speed does not matter here; clarity does.

Rounding: `np.rint` rounds half to even, as `torch.round` does (the simulator uses torch.round), so an
exact tie goes the same way in both.

Layout (SPEC section 4): a weight W [out, fan_in] is split along the fan-in into T = ceil(fan_in / S)
tiles of S = subArray rows, the last one zero padded. Conventions of the arrays below:
- q, tiled weights: [out, T, S]; weight scales: [out, T]
- slices: [K, out, T, S] (slice 0 least significant)
- differential reads G_pos - G_neg ("reads"): [T, S, K, out]
- input bit planes: [Z, n, T, S] (z = 0 .. a_in - 2)
- partial sums P: [T, Z, K, n, out]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

MODES = ("dynamic", "dynamic_tile", "calibrated", "full")


class Hardware(Protocol):
    """The hardware parameters the oracle reads (an `nipa.hardware.config.HWConfig` has them all)."""

    wl_weight: int
    wl_input: int
    subArray: int
    ADCprecision: int
    cellBit: int
    onoffratio: float
    adc_mode: str


@dataclass
class OracleResult:
    """y: the layer output (bias included); tie_slack: per output, the largest change that flipping
    every ADC read lying within `tie_margin` of a rounding tie could make (0 when tie_margin is 0);
    near_ties: how many reads were that close."""

    y: np.ndarray
    tie_slack: np.ndarray
    near_ties: int


def round_half_even(a: np.ndarray) -> np.ndarray:
    # Half to even, the rule of torch.round that the simulator uses.
    return np.rint(a)


def max_level(bits: int) -> int:
    """2^(b-1) - 1: the largest magnitude of a signed (sign-magnitude) b-bit integer."""
    return 2 ** (bits - 1) - 1


def num_slices(weight_bits: int, cell_bits: int) -> int:
    """K = ceil((b - 1) / c)."""
    return math.ceil((weight_bits - 1) / cell_bits)


def tile(matrix: np.ndarray, rows: int) -> np.ndarray:
    """[..., fan_in] -> [..., T, rows], the last tile zero padded."""
    fan_in = matrix.shape[-1]
    tiles = math.ceil(fan_in / rows)
    padded = np.zeros(matrix.shape[:-1] + (tiles * rows,), dtype=np.float64)
    padded[..., :fan_in] = matrix
    return padded.reshape(matrix.shape[:-1] + (tiles, rows))


def quantize_weight(weight: np.ndarray, bits: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric max-abs per (output channel, tile): W [out, fan_in] -> (q [out, T, S], scale [out, T])."""
    tiles = tile(np.asarray(weight, dtype=np.float64), rows)
    out, num_tiles, _ = tiles.shape
    levels = max_level(bits)
    q = np.zeros_like(tiles)
    scale = np.ones((out, num_tiles))
    for o in range(out):
        for t in range(num_tiles):
            peak = np.abs(tiles[o, t]).max()
            # An all-zero tile keeps scale 1: its q is 0 whatever the scale.
            scale[o, t] = peak / levels if peak > 0 else 1.0
            q[o, t] = np.clip(round_half_even(tiles[o, t] / scale[o, t]), -levels, levels)
    return q, scale


def slice_weight(q: np.ndarray, bits: int, cell_bits: int) -> np.ndarray:
    """Sign-magnitude digits: s_k = sign(q) * (floor(|q| / 2^(c k)) mod 2^c) -> [K, ...]."""
    base = 2**cell_bits
    magnitude = np.abs(q)
    sign = np.sign(q)
    digits = [sign * (np.floor(magnitude / base**k) % base) for k in range(num_slices(bits, cell_bits))]
    return np.stack(digits)


def differential_reads(slices: np.ndarray, cell_bits: int, onoffratio: float) -> np.ndarray:
    """G_pos - G_neg of every cell pair without device error, in level units: [K, out, T, S] -> [T, S, K, out].

    The positive cell holds level max(s, 0), the negative one max(-s, 0); each adds the leak
    g0 = (2^c - 1) / (R - 1). The leaks cancel in the difference; it is formed as
    (d_pos - d_neg) + (g0 - g0) so that float64 keeps the cancellation exact (an inexact leak would turn
    exact ADC ties into near ties that round either way)."""
    g0 = (2**cell_bits - 1) / (onoffratio - 1)
    d_pos = np.maximum(slices, 0)
    d_neg = np.maximum(-slices, 0)
    diff = (d_pos - d_neg) + (g0 - g0)
    return diff.transpose(2, 3, 0, 1)  # [K, out, T, S] -> [T, S, K, out]


def reads_from_columns(columns: np.ndarray | torch.Tensor, k: int, out: int, rows: int) -> np.ndarray:
    """Programmed differential reads stored as columns [T, r, K*out] (index [t, r, k*out + o]; r <= S
    rows when the layer uses fewer rows than the crossbar has) -> [T, S, K, out]. Missing rows are
    zero: they only ever meet zero inputs (padding)."""
    if isinstance(columns, torch.Tensor):
        columns = columns.detach().cpu().double().numpy()
    t, r, _ = columns.shape
    reads = np.zeros((t, rows, k, out))
    reads[:, :r] = columns.reshape(t, r, k, out)
    return reads


def quantize_input(x: np.ndarray, bits: int, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Per-tensor symmetric max-abs to `bits` bits -> (integer-valued x_q, scale); a zero tensor gets 1."""
    x = np.asarray(x, dtype=np.float64)
    levels = max_level(bits)
    if scale is None:
        peak = np.abs(x).max() if x.size else 0.0
        scale = peak / levels if peak > 0 else 1.0
    return np.clip(round_half_even(x / scale), -levels, levels), float(scale)


def bit_planes(x_q: np.ndarray, bits: int) -> np.ndarray:
    """x_z = sign(x_q) * bit_z(|x_q|), z = 0 .. bits-2 -> [Z, ...]."""
    magnitude = np.abs(x_q).astype(np.int64)
    sign = np.sign(x_q)
    return np.stack([sign * ((magnitude >> z) & 1) for z in range(bits - 1)]).astype(np.float64)


def partial_sums(planes: np.ndarray, reads: np.ndarray) -> np.ndarray:
    """P[t, z, k] = sum_rows x_z[:, t, rows] (G_pos - G_neg)[t, rows, k, :]: [Z, n, T, S] x [T, S, K, out]
    -> [T, Z, K, n, out]."""
    num_bits, n, num_tiles, _ = planes.shape
    k_slices, out = reads.shape[2:]
    partial = np.zeros((num_tiles, num_bits, k_slices, n, out))
    for t in range(num_tiles):
        for z in range(num_bits):
            for k in range(k_slices):
                partial[t, z, k] = planes[z, :, t, :] @ reads[t, :, k, :]
    return partial


def adc_ranges(partial: np.ndarray, hw: Hardware, mode: str,
               calibrated_range: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per read, each [T, Z, K]."""
    num_tiles, num_bits, k_slices = partial.shape[:3]
    lo = np.zeros((num_tiles, num_bits, k_slices))
    hi = np.zeros((num_tiles, num_bits, k_slices))
    for z in range(num_bits):
        for k in range(k_slices):
            if mode == "dynamic":
                # One range per (layer, bit, slice) over all tiles, rows and columns.
                lo[:, z, k] = partial[:, z, k].min()
                hi[:, z, k] = partial[:, z, k].max()
            elif mode == "dynamic_tile":
                for t in range(num_tiles):
                    lo[t, z, k] = partial[t, z, k].min()
                    hi[t, z, k] = partial[t, z, k].max()
            elif mode == "calibrated":
                if calibrated_range is None:
                    raise ValueError("calibrated mode needs a measured range [K, 2]")
                lo[:, z, k], hi[:, z, k] = calibrated_range[k]
            elif mode == "full":
                # The physical full scale of a column: S rows at the top level, inputs of either sign.
                full = hw.subArray * (2**hw.cellBit - 1)
                lo[:, z, k], hi[:, z, k] = -full, full
            else:
                raise ValueError(f"unknown ADC mode {mode!r}")
    return lo, hi


def adc_read(partial: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """lo + step * clamp(round((P - lo) / step), 0, 2^a), step = (hi - lo) / 2^a; P itself if step == 0."""
    levels = 2**bits
    step = (hi - lo) / levels
    if step == 0:
        return partial.copy()
    return lo + step * np.clip(round_half_even((partial - lo) / step), 0, levels)


def _tie_distance(partial: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """How far (in ADC steps) each read's index is from a rounding tie; inf when step == 0."""
    step = (hi - lo) / 2**bits
    if step == 0:
        return np.full(partial.shape, np.inf)
    u = (partial - lo) / step
    return np.abs(u - np.floor(u) - 0.5)


def crossbar_matmul(weight: np.ndarray, x: np.ndarray, hw: Hardware, *, mode: str | None = None,
                    reads: np.ndarray | None = None, calibrated_range: np.ndarray | None = None,
                    scale_in: float | None = None, tie_margin: float = 0.0) -> OracleResult:
    """y = scale_in sum_z 2^z sum_k 2^(c k) sum_t scale_w[:, t] ADC(P_{t,z,k}) for W [out, fan_in] and
    x [n, fan_in] (no bias). `reads`: programmed differential reads [T, S, K, out] (device error);
    without them the oracle's own slices are used. `scale_in`: the per-tensor input scale when x is not
    the whole layer input (a convolution's im2col rows)."""
    mode = hw.adc_mode if mode is None else mode
    rows, c = hw.subArray, hw.cellBit
    q, scale_w = quantize_weight(weight, hw.wl_weight, rows)
    if reads is None:
        reads = differential_reads(slice_weight(q, hw.wl_weight, c), c, hw.onoffratio)
    x_q, scale_in = quantize_input(x, hw.wl_input, scale_in)
    planes = bit_planes(tile(x_q, rows), hw.wl_input)  # [Z, n, T, S]
    partial = partial_sums(planes, reads)
    lo, hi = adc_ranges(partial, hw, mode, calibrated_range)
    num_tiles, num_bits, k_slices, n, out = partial.shape
    y = np.zeros((n, out))
    slack = np.zeros((n, out))
    near = 0
    for z in range(num_bits):
        for k in range(k_slices):
            weight_zk = 2.0**z * 2.0 ** (c * k)
            for t in range(num_tiles):
                read = adc_read(partial[t, z, k], lo[t, z, k], hi[t, z, k], hw.ADCprecision)
                y += weight_zk * scale_w[:, t] * read
                if tie_margin > 0:
                    close = _tie_distance(partial[t, z, k], lo[t, z, k], hi[t, z, k], hw.ADCprecision) <= tie_margin
                    step = (hi[t, z, k] - lo[t, z, k]) / 2**hw.ADCprecision
                    slack += close * (weight_zk * step) * scale_w[:, t]
                    near += int(close.sum())
    return OracleResult(y * scale_in, slack * scale_in, near)


def partial_sum_range(weight: np.ndarray, x: np.ndarray, hw: Hardware, *, reads: np.ndarray | None = None,
                      scale_in: float | None = None) -> np.ndarray:
    """[K, 2]: min and max of P over all tiles, input bits, rows and columns, per slice."""
    rows, c = hw.subArray, hw.cellBit
    q, _ = quantize_weight(weight, hw.wl_weight, rows)
    if reads is None:
        reads = differential_reads(slice_weight(q, hw.wl_weight, c), c, hw.onoffratio)
    x_q, _ = quantize_input(x, hw.wl_input, scale_in)
    partial = partial_sums(bit_planes(tile(x_q, rows), hw.wl_input), reads)
    return np.stack([[partial[:, :, k].min(), partial[:, :, k].max()] for k in range(partial.shape[2])])


def fake_quantized_matmul(weight: np.ndarray, x: np.ndarray, hw: Hardware,
                          scale_in: float | None = None) -> np.ndarray:
    """The plain fake-quantized product: per-(channel, tile) weight scales, per-tensor input scale."""
    q, scale_w = quantize_weight(weight, hw.wl_weight, hw.subArray)
    x_q, scale_in = quantize_input(x, hw.wl_input, scale_in)
    weight_fq = (q * scale_w[:, :, None]).reshape(q.shape[0], -1)[:, : weight.shape[1]]
    return (x_q * scale_in) @ weight_fq.T


# ---- layers -------------------------------------------------------------------------------------


def im2col(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """[N, C, H, W] -> (rows [N * OH * OW, C * kh * kw], OH, OW); a row's fan-in is ordered (C, kh, kw)
    as PyTorch flattens a conv weight, rows are ordered (n, oh, ow)."""
    n, channels, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    padded = np.zeros((n, channels, height + 2 * ph, width + 2 * pw))
    padded[:, :, ph:ph + height, pw:pw + width] = x
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = np.zeros((n, out_h, out_w, channels, kh, kw))
    for i in range(out_h):
        for j in range(out_w):
            for a in range(kh):
                for b in range(kw):
                    rows[:, i, j, :, a, b] = padded[:, :, i * sh + a * dh, j * sw + b * dw]
    return rows.reshape(n * out_h * out_w, channels * kh * kw), out_h, out_w


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _input_scale(x: np.ndarray, bits: int) -> float:
    return quantize_input(x, bits)[1]


def layer_rows(layer: nn.Module, x: torch.Tensor, hw: Hardware) -> tuple[np.ndarray, float]:
    """The matrix-product view of a layer's input: (rows [n, fan_in], per-tensor input scale)."""
    data = _numpy(x)
    # The input scale is the max-abs of the layer input itself (for a convolution: not of its im2col rows).
    scale_in = _input_scale(data, hw.wl_input)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("the oracle maps groups-1, zero-padded convolutions with integer padding only")
        rows, _, _ = im2col(data, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        return rows, scale_in
    if isinstance(layer, nn.Linear):
        return data.reshape(-1, layer.in_features), scale_in
    raise TypeError(f"the oracle maps nn.Linear and nn.Conv2d, not {type(layer).__name__}")


def weight_matrix(layer: nn.Module) -> np.ndarray:
    weight = _numpy(layer.weight)
    return weight.reshape(weight.shape[0], -1)  # a conv weight flattens as (C_in, k_h, k_w)


def _fold_output(layer: nn.Module, x: torch.Tensor, y: np.ndarray, with_bias: bool = True) -> np.ndarray:
    """[n, out] matrix-product output -> the layer's output shape, plus the bias."""
    bias = None if layer.bias is None or not with_bias else _numpy(layer.bias)
    if isinstance(layer, nn.Conv2d):
        _, out_h, out_w = im2col(np.zeros((1,) + tuple(x.shape[1:])), layer.kernel_size, layer.stride,
                                 layer.padding, layer.dilation)
        y = y.reshape(x.shape[0], out_h, out_w, -1).transpose(0, 3, 1, 2)
        return y if bias is None else y + bias[None, :, None, None]
    y = y.reshape(tuple(x.shape[:-1]) + (y.shape[-1],))
    return y if bias is None else y + bias


def layer_forward(layer: nn.Module, x: torch.Tensor, hw: Hardware, *, mode: str | None = None,
                  columns: np.ndarray | torch.Tensor | None = None, calibrated_range: np.ndarray | None = None,
                  tie_margin: float = 0.0) -> OracleResult:
    """An nn.Linear or nn.Conv2d computed on crossbars as SPEC section 4 says (bias included).
    `columns`: programmed differential reads in the simulator's layout [T, r, K*out]."""
    weight = weight_matrix(layer)
    rows, scale_in = layer_rows(layer, x, hw)
    reads = None
    if columns is not None:
        reads = reads_from_columns(columns, num_slices(hw.wl_weight, hw.cellBit), weight.shape[0], hw.subArray)
    result = crossbar_matmul(weight, rows, hw, mode=mode, reads=reads, calibrated_range=calibrated_range,
                             scale_in=scale_in, tie_margin=tie_margin)
    slack = _fold_output(layer, x, result.tie_slack, with_bias=False)  # a bound on a difference: no bias
    return OracleResult(_fold_output(layer, x, result.y), slack, result.near_ties)


def calibrate(layer: nn.Module, batches: Iterable[torch.Tensor], hw: Hardware, *,
              columns: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """The `calibrated` mode's range [K, 2]: min and max of P over every tile, input bit, row and column
    of every calibration batch, per slice."""
    weight = weight_matrix(layer)
    reads = None
    if columns is not None:
        reads = reads_from_columns(columns, num_slices(hw.wl_weight, hw.cellBit), weight.shape[0], hw.subArray)
    ranges = []
    for x in batches:
        rows, scale_in = layer_rows(layer, x, hw)
        ranges.append(partial_sum_range(weight, rows, hw, reads=reads, scale_in=scale_in))
    stacked = np.stack(ranges)  # [batches, K, 2]
    return np.stack([stacked[:, :, 0].min(axis=0), stacked[:, :, 1].max(axis=0)], axis=1)


def fake_quantized_layer(layer: nn.Module, x: torch.Tensor, hw: Hardware) -> np.ndarray:
    """The layer with fake-quantized weights (per-(channel, tile) scales) and inputs (per tensor)."""
    rows, scale_in = layer_rows(layer, x, hw)
    return _fold_output(layer, x, fake_quantized_matmul(weight_matrix(layer), rows, hw, scale_in))
