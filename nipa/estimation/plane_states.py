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
applied and fresh noise of the class's deviation drawn (docs/estimate_analysis.md). This module counts
the set rows of every (patch, tile, bit) plane and classes them; the tables come from
`nipa.estimation.inject.AdcCalibration`. (Classing planes from a patch's bitwise OR/AND and extrema
alone, without the counts, was measured 2.2x instead of 3-5x plain inference but lost the sparse
planes' class: 4-5 points further off at 3-bit ADCs, docs/estimate_analysis.md section 7.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Plane classes: the three known reads, then the mixed planes by log2 of their set rows.
ZERO, ALL_POSITIVE, ALL_NEGATIVE = range(3)
KNOWN = 3
MIXED_CLASSES = 10  # set rows 1, 2, 3-4, ..., 257-512, and above


def num_classes() -> int:
    return KNOWN + MIXED_CLASSES


def mixed_class(set_rows: int) -> int:
    """The class of a mixed plane with `set_rows` rows set."""
    return KNOWN + min(max(0, (set_rows - 1).bit_length()), MIXED_CLASSES - 1)


def tile_row_counts(fan_in: int, rows: int) -> torch.Tensor:
    """[T]: the real rows of each tile (the last tile may be short)."""
    tiles = -(-fan_in // rows)
    counts = torch.full((tiles,), rows, dtype=torch.int64)
    counts[-1] = fan_in - (tiles - 1) * rows
    return counts


def _class_of_count(most: int, device: torch.device) -> torch.Tensor:
    """[most + 1]: the class of a plane with that many rows set, ignoring signs (0 -> ZERO)."""
    count = torch.arange(most + 1, device=device)
    bucket = torch.ceil(torch.log2(count.clamp(min=1).double())).long()  # 1 -> 0, 2 -> 1, 3-4 -> 2, ...
    classes = KNOWN + bucket.clamp(max=MIXED_CLASSES - 1)
    classes[0] = ZERO
    return classes


def plane_class(count_pos: torch.Tensor, count_neg: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The class (int64) of planes with `count_pos` / `count_neg` rows set to +1 / -1 out of `real`."""
    count = (count_pos + count_neg).long()
    classes = _class_of_count(int(real.max()) if real.numel() else 0, count.device)[count.clamp(min=0)]
    classes = torch.where(count_pos == real, ALL_POSITIVE, classes)
    return torch.where(count_neg == real, ALL_NEGATIVE, classes)


def row_classes(x_tiles: torch.Tensor, bits: int, tile_rows: torch.Tensor) -> torch.Tensor:
    """Class of every (row, tile, bit) plane: x_tiles [n, T, S] integer input levels (zero-padded last
    tile) -> [n, T, bits] int64."""
    magnitude = x_tiles.abs().to(torch.int32)
    positive, negative = x_tiles > 0, x_tiles < 0
    real = tile_rows.to(x_tiles.device).view(1, -1, 1)
    classes = []
    for z in range(bits):
        bit = ((magnitude >> z) & 1).bool()
        classes.append(plane_class((bit & positive).sum(-1, keepdim=True), (bit & negative).sum(-1, keepdim=True),
                                   real))
    return torch.cat(classes, dim=-1)


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


def conv_plane_classes(levels: torch.Tensor, bits: int, weight_shape: tuple[int, ...], rows: int,
                       stride, padding: tuple[int, int, int, int], dilation) -> torch.Tensor:
    """Plane classes of a convolution's input patches: levels [N, C, H, W] integer input levels ->
    [N, bits, T, OH, OW] int64.

    Each tile's rows are the crossbar's (the fan-in order of a flattened conv weight, channel-major; zero
    padding is part of a patch). Per bit, the set rows are summed over the tile's channels first, then
    over the kernel window by strided slices, separably (measured several times faster than a
    convolution or a pooling with a one-channel kernel on a CPU); a channel that a tile boundary splits
    adds the kernel positions of its rows in that tile. Counts are small integers, exact in float32."""
    _, channels, kh, kw = weight_shape
    (sh, sw), (dh, dw) = stride, dilation
    if any(padding):
        levels = F.pad(levels, padding)
    height, width = levels.shape[-2:]
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    pieces = _tile_pieces(channels * kh * kw, rows, kh * kw)
    magnitude = levels.abs().to(torch.int32)

    def at(x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return x[..., i * dh:i * dh + (out_h - 1) * sh + 1:sh, j * dw:j * dw + (out_w - 1) * sw + 1:sw]

    def window_sum(x: torch.Tensor) -> torch.Tensor:  # [..., H, W] -> [..., OH, OW], the whole window
        rows_sum = x[..., 0:(out_h - 1) * sh + 1:sh, :]
        for i in range(1, kh):
            rows_sum = rows_sum + x[..., i * dh:i * dh + (out_h - 1) * sh + 1:sh, :]
        out = rows_sum[..., 0:(out_w - 1) * sw + 1:sw]
        for j in range(1, kw):
            out = out + rows_sum[..., j * dw:j * dw + (out_w - 1) * sw + 1:sw]
        return out

    def counts(selected: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] 0/1 -> [N, T, OH, OW]
        per_tile = []
        for tile in pieces:
            total = None
            for c0, c1, positions in tile:
                part = selected[:, c0:c1].sum(1, dtype=torch.float32)
                if positions is None:
                    value = window_sum(part)
                else:
                    value = sum(at(part, *divmod(p, kw)) for p in positions)
                total = value if total is None else total + value
            per_tile.append(total)
        return torch.stack(per_tile, 1)

    signed = bool((levels < 0).any())
    positive, negative = (levels > 0), (levels < 0)
    count_pos, count_neg = [], []
    for z in range(bits):
        bit = ((magnitude >> z) & 1).bool()
        if signed:
            count_pos.append(counts(bit & positive))
            count_neg.append(counts(bit & negative))
        else:
            count_pos.append(counts(bit))
    count_pos = torch.stack(count_pos, 1)  # [N, Z, T, OH, OW]
    count_neg = torch.stack(count_neg, 1) if signed else torch.zeros_like(count_pos)
    real = tile_row_counts(channels * kh * kw, rows).to(levels.device, torch.float32).view(1, 1, -1, 1, 1)
    return plane_class(count_pos, count_neg, real)


def linear_plane_classes(levels: torch.Tensor, bits: int, fan_in: int, rows: int) -> torch.Tensor:
    """levels [..., fan_in] -> [..., bits, T] plane classes of a linear layer's rows."""
    tile_rows = tile_row_counts(fan_in, rows)
    tiles = tile_rows.numel()
    pad = tiles * rows - fan_in
    x = F.pad(levels, (0, pad)) if pad else levels
    x = x.reshape(*levels.shape[:-1], tiles, rows)
    return row_classes(x.reshape(-1, tiles, rows), bits, tile_rows).reshape(*levels.shape[:-1], tiles, bits
                                                                            ).transpose(-1, -2)
