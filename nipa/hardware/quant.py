"""Quantization and bit slicing (SPEC section 4, steps 1-4).

Weights are handled as a matrix W [out, fan_in] (a convolution's weight flattened as PyTorch does,
(C_in, k_h, k_w)), split along the fan-in into tiles of `rows` crossbar rows:
W -> [out, T, rows]. Every function here is pure tensor arithmetic shared by the simulator, the
statistics, the metric and the error injection, so all of them quantize the same way.
"""

from __future__ import annotations

import math

import torch


def num_tiles(fan_in: int, rows: int) -> int:
    return math.ceil(fan_in / rows)


def tile_columns(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """[..., fan_in] -> [..., T, rows], zero-padding the last tile."""
    fan_in = matrix.shape[-1]
    tiles = num_tiles(fan_in, rows)
    pad = tiles * rows - fan_in
    if pad:
        matrix = torch.nn.functional.pad(matrix, (0, pad))
    return matrix.reshape(*matrix.shape[:-1], tiles, rows)


def untile_columns(tiled: torch.Tensor, fan_in: int) -> torch.Tensor:
    """[..., T, rows] -> [..., fan_in], dropping the padding."""
    return tiled.reshape(*tiled.shape[:-2], -1)[..., :fan_in]


def max_level(bits: int) -> int:
    """Largest magnitude of a signed `bits`-bit integer (sign-magnitude / symmetric)."""
    return 2 ** (bits - 1) - 1


def quantize_weight_tiles(weight_tiles: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric max-abs quantization per (output channel, tile).

    weight_tiles [out, T, rows] -> (integer-valued q [out, T, rows], scale [out, T]).
    A tile of zeros gets scale 1 (its q is 0 whatever the scale).
    """
    levels = max_level(bits)
    scale = weight_tiles.abs().amax(dim=-1) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(weight_tiles / scale.unsqueeze(-1)), -levels, levels)
    return q, scale


def slice_magnitude(q: torch.Tensor, bits: int, cell_bits: int, num_slices: int | None = None) -> torch.Tensor:
    """Sign-magnitude slices s_k = sign(q) * d_k, d_k the k-th `cell_bits`-wide digit of |q|.

    q [...] integer-valued -> [K, ...] with K = ceil((bits - 1) / cell_bits); slice 0 is the least
    significant. sum_k 2^(cell_bits*k) s_k == q exactly. A smaller `num_slices` keeps only the low
    digits (the original tool's slice count, `--compat original_slices`).
    """
    if num_slices is None:
        num_slices = math.ceil((bits - 1) / cell_bits)
    magnitude = q.abs().to(torch.int64)
    base = 2**cell_bits
    digits = [(magnitude // base**k) % base for k in range(num_slices)]
    return torch.stack(digits).to(q.dtype) * torch.sign(q)


def slice_significance(num_slices: int, cell_bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2^(c*k) for k = 0..K-1."""
    return torch.tensor([2.0 ** (cell_bits * k) for k in range(num_slices)], device=device, dtype=dtype)


def input_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric max-abs scale (a 0-dim tensor; 1 for an all-zero tensor)."""
    scale = x.detach().abs().amax() / max_level(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_input(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (integer-valued x_q, scale) with symmetric max-abs per-tensor scaling. An integer x holds
    levels already (`input_levels` with this scale): it is returned as float."""
    if not x.is_floating_point():
        if scale is None:
            raise ValueError("integer input levels need the scale they were quantized with")
        return x.float(), scale
    if scale is None:
        scale = input_scale(x, bits)
    levels = max_level(bits)
    return torch.clamp(torch.round(x / scale), -levels, levels), scale


def input_levels(x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """The integer levels of `quantize_input` in the narrowest integer type that holds them (int8 up
    to 8-bit inputs): quantizing a convolution's input before im2col moves a quarter of the bytes and
    rounds each pixel once instead of once per kernel window it falls in, with the same levels."""
    levels = max_level(bits)
    dtype = torch.int8 if levels <= 127 else torch.int16 if levels <= 32767 else torch.int32
    return torch.clamp(torch.round(x.float() / scale), -levels, levels).to(dtype)


def input_bit_planes(x_q: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-serial planes x_z = sign(x_q) * bit_z(|x_q|), z = 0 .. bits-2: [Z, ...] with values in
    {-1, 0, 1}; sum_z 2^z x_z == x_q."""
    magnitude = x_q.abs().to(torch.int64)
    sign = torch.sign(x_q)
    planes = [((magnitude >> z) & 1).to(x_q.dtype) for z in range(bits - 1)]
    return torch.stack(planes) * sign


def fake_quantize_weight(weight: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Quantize-dequantize a weight (any shape, fan-in flattened as PyTorch does) with per-(channel,
    tile) scales: what the crossbar computes with an ideal ADC and ideal cells."""
    matrix = weight.reshape(weight.shape[0], -1)
    q, scale = quantize_weight_tiles(tile_columns(matrix, rows), bits)
    return untile_columns(q * scale.unsqueeze(-1), matrix.shape[1]).reshape(weight.shape)


def fake_quantize_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    x_q, scale = quantize_input(x, bits)
    return x_q * scale
