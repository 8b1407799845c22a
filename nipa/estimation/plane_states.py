"""The ADC error of a bit plane whose read is known: the "planes" form of the measured ADC error.

A bit-serial crossbar reads, per tile t and input bit z, the plane x_z = sign * bit_z(|x|) of the tile's
input rows. Three kinds of plane have a read that does not depend on which rows are set:

- zero: no row has bit z (a ReLU's zero patch, the high bits of small activations): P = 0 in every
  column; a dynamic range [lo, hi] whose grid misses zero gives it the same error in every such read;
- all positive / all negative: every row has bit z with one sign (a constant background patch): P is the
  column sum of the tile's slice values, with that sign.

The simulator's ADC gives such reads a fixed error per (tile, bit, output channel) within a batch, not
noise: a background patch that every image repeats errs alike everywhere. The "planes" form applies those
errors exactly. The other ("mixed") planes are classed by how many rows they set (1, 2, 3-4, 5-8, ...):
a plane with few rows set has a small read, which a coarse ADC rounds to the zero read's level (its
signal lost, a deterministic error), a dense plane's read errs like noise. Per class the mean error is
applied and fresh noise of the class's deviation drawn (docs/estimate_analysis.md). This module finds the
plane classes of a layer's input; the tables come from `nipa.estimation.inject.AdcCalibration`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Plane classes: the three known reads, then the mixed planes: the patch's top bit (its largest
# level's highest set bit: a sparse plane, at least one row set) and the bits below it.
ZERO, ALL_POSITIVE, ALL_NEGATIVE, MIXED_TOP, MIXED_BELOW = range(5)
KNOWN = 3
CLASSES = 5


def num_classes() -> int:
    return CLASSES


def tile_row_counts(fan_in: int, rows: int) -> torch.Tensor:
    """[T]: the real rows of each tile (the last tile may be short)."""
    tiles = -(-fan_in // rows)
    counts = torch.full((tiles,), rows, dtype=torch.int64)
    counts[-1] = fan_in - (tiles - 1) * rows
    return counts


def patch_codes(high: torch.Tensor, low: torch.Tensor, bits: int, max_level: int) -> torch.Tensor:
    """One code per (row, tile) patch from its largest and smallest input level, which fixes the class
    of every bit plane (`code_classes`): 1 + the top bit of its largest magnitude (0..bits) for a patch
    that is not constant, bits + 1 + (level + max_level) for a constant one."""
    high, low = high.round().long(), low.round().long()
    magnitude = torch.maximum(high.abs(), low.abs())
    top = torch.floor(torch.log2(magnitude.clamp(min=1).double())).long() + (magnitude > 0).long()
    return torch.where(high == low, bits + 1 + high + max_level, top)


def code_classes(bits: int, max_level: int) -> torch.Tensor:
    """[codes, bits]: the class of bit plane z for each patch code (`patch_codes`). A constant patch has
    a known read in every plane (bit z of its level set: all positive or all negative, else zero);
    otherwise planes above the top bit of its largest magnitude are zero and the others mixed (the top
    one, then those below it). Planes below the top bit that happen to be empty are classed mixed:
    finding them needs a count per bit, measured at several times the cost of the layer itself."""
    z = torch.arange(bits)
    top = torch.arange(bits + 1).view(-1, 1) - 1  # codes 0..bits: top bit -1..bits-1
    mixed = torch.where(z > top, ZERO, torch.where(z == top, MIXED_TOP, MIXED_BELOW))
    level = torch.arange(-max_level, max_level + 1).view(-1, 1)
    set_bit = ((level.abs() >> z) & 1).bool()
    known = torch.where(set_bit, torch.where(level > 0, ALL_POSITIVE, ALL_NEGATIVE), ZERO)
    return torch.cat([mixed, known]).long()


def classes_of_extrema(high: torch.Tensor, low: torch.Tensor, bits: int, max_level: int,
                       bit_dim: int) -> torch.Tensor:
    """high, low [...] -> int64 plane classes with a bit axis of size `bits` inserted at `bit_dim`."""
    classes = code_classes(bits, max_level).to(high.device)[patch_codes(high, low, bits, max_level)]
    return classes.movedim(-1, bit_dim)


def code_tables(mean: torch.Tensor, var: torch.Tensor, max_level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch code the summed mean error and variance of its planes: mean, var [C, Z, T, out] (per
    class, bit, tile, output) -> [T, codes, out] each, so that a forward adds one table row per tile."""
    classes = code_classes(mean.shape[1], max_level).to(mean.device)  # [codes, Z]
    z = torch.arange(mean.shape[1], device=mean.device)
    picked_mean = mean[classes, z]  # [codes, Z, T, out]
    picked_var = var[classes, z]
    return picked_mean.sum(1).transpose(0, 1).contiguous(), picked_var.sum(1).transpose(0, 1).contiguous()


def row_classes(x_tiles: torch.Tensor, bits: int, tile_rows: torch.Tensor) -> torch.Tensor:
    """Class of every (row, tile, bit) plane: x_tiles [n, T, S] integer input levels (the last tile
    zero-padded beyond its real rows) -> [n, T, bits] int64."""
    real = torch.arange(x_tiles.shape[-1], device=x_tiles.device) < tile_rows.to(x_tiles.device).view(-1, 1)
    high = torch.where(real, x_tiles, torch.full_like(x_tiles, -torch.inf)).amax(-1)
    low = torch.where(real, x_tiles, torch.full_like(x_tiles, torch.inf)).amin(-1)
    return classes_of_extrema(high, low, bits, 2**bits - 1, bit_dim=2)


def _tile_pieces(fan_in: int, rows: int, window: int) -> list[list[tuple[int, int, list[int] | None]]]:
    """Per tile, its rows as (first channel, end channel, kernel positions or None for all of them)."""
    tile_rows = tile_row_counts(fan_in, rows)
    pieces = []
    for t in range(tile_rows.numel()):
        first, last = t * rows, t * rows + int(tile_rows[t])
        full_lo, full_hi = -(-first // window), last // window
        tile = [(full_lo, full_hi, None)] if full_hi > full_lo else []
        for c in sorted({first // window, (last - 1) // window} - set(range(full_lo, full_hi))):
            positions = list(range(max(first - c * window, 0), min(last - c * window, window)))
            tile.append((c, c + 1, positions))
        pieces.append(tile)
    return pieces


def _window_max(x: torch.Tensor, kh: int, kw: int, out_h: int, out_w: int, stride, dilation) -> torch.Tensor:
    """The max over each output's kernel window, separably (kernel rows, then columns) with strided
    slices: [..., H, W] -> [..., OH, OW]. Measured several times faster than max_pool2d on a CPU for
    these few-channel tensors."""
    (sh, sw), (dh, dw) = stride, dilation
    rows = x[..., 0:(out_h - 1) * sh + 1:sh, :]
    for i in range(1, kh):
        rows = torch.maximum(rows, x[..., i * dh:i * dh + (out_h - 1) * sh + 1:sh, :])
    out = rows[..., 0:(out_w - 1) * sw + 1:sw]
    for j in range(1, kw):
        out = torch.maximum(out, rows[..., j * dw:j * dw + (out_w - 1) * sw + 1:sw])
    return out


def conv_patch_extrema(levels: torch.Tensor, weight_shape: tuple[int, ...], rows: int,
                       stride, padding: tuple[int, int, int, int], dilation) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and smallest input level of every (patch, tile): levels [N, C, H, W] integer input
    levels -> (high, low) [N, T, OH, OW]. Each tile's rows are the crossbar's (the fan-in order of a flattened
    conv weight, channel-major; zero padding is part of a patch): the extrema over a tile's channels
    first, then over the kernel positions by strided slices."""
    _, channels, kh, kw = weight_shape
    (sh, sw), (dh, dw) = stride, dilation
    if any(padding):
        levels = F.pad(levels, padding)
    height, width = levels.shape[-2:]
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1

    def at(x: torch.Tensor, position: int) -> torch.Tensor:  # the kernel position's input under each output
        i, j = divmod(position, kw)
        return x[..., i * dh:i * dh + (out_h - 1) * sh + 1:sh, j * dw:j * dw + (out_w - 1) * sw + 1:sw]

    tiles = _tile_pieces(channels * kh * kw, rows, kh * kw)
    # The whole-window pieces of every tile, highs and negated lows, pooled in one call.
    whole = [(t, c0, c1) for t, tile in enumerate(tiles) for c0, c1, positions in tile if positions is None]

    def channel_extrema(c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = levels[:, c0:c1]
        return (part.amax(1), part.amin(1)) if c1 - c0 > 1 else (part[:, 0], part[:, 0])

    pooled = None
    if whole:
        extrema = [channel_extrema(c0, c1) for _, c0, c1 in whole]
        stacked = torch.stack([e[0] for e in extrema] + [-e[1] for e in extrema], 1)
        pooled = _window_max(stacked, kh, kw, out_h, out_w, stride, dilation)
    highs: list[torch.Tensor | None] = [None] * len(tiles)
    lows: list[torch.Tensor | None] = [None] * len(tiles)
    for i, (t, _, _) in enumerate(whole):
        highs[t], lows[t] = pooled[:, i], -pooled[:, len(whole) + i]
    for t, tile in enumerate(tiles):
        for c0, c1, positions in tile:
            if positions is None:
                continue
            part_high, part_low = channel_extrema(c0, c1)
            high = torch.stack([at(part_high, p) for p in positions]).amax(0)
            low = torch.stack([at(part_low, p) for p in positions]).amin(0)
            highs[t] = high if highs[t] is None else torch.maximum(highs[t], high)
            lows[t] = low if lows[t] is None else torch.minimum(lows[t], low)
    return torch.stack(highs, 1), torch.stack(lows, 1)


def linear_patch_extrema(levels: torch.Tensor, fan_in: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """levels [..., fan_in] -> (high, low) [..., T]: the extrema of a linear layer's rows per tile."""
    tile_rows = tile_row_counts(fan_in, rows)
    tiles = tile_rows.numel()
    pad = tiles * rows - fan_in
    x = F.pad(levels, (0, pad)) if pad else levels
    x = x.reshape(*levels.shape[:-1], tiles, rows)
    real = torch.arange(rows, device=x.device) < tile_rows.to(x.device).view(-1, 1)
    high = torch.where(real, x, torch.full_like(x, -torch.inf)).amax(-1)
    low = torch.where(real, x, torch.full_like(x, torch.inf)).amin(-1)
    return high, low
