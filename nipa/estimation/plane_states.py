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

# Plane classes: the three known reads, then the mixed planes by log2 of their set rows.
ZERO, ALL_POSITIVE, ALL_NEGATIVE, MIXED = range(4)
KNOWN = 3
MIXED_CLASSES = 10  # set rows 1, 2, 3-4, ..., 257-512, and above


def num_classes() -> int:
    return KNOWN + MIXED_CLASSES


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
    classes = torch.where(count_pos == real, torch.full_like(classes, ALL_POSITIVE), classes)
    return torch.where(count_neg == real, torch.full_like(classes, ALL_NEGATIVE), classes)


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


def conv_plane_classes(levels: torch.Tensor, bits: int, weight_shape: tuple[int, ...], rows: int,
                       stride, padding: tuple[int, int, int, int], dilation) -> torch.Tensor:
    """Plane classes of a convolution's input patches: levels [N, C, H, W] integer input levels ->
    [N, bits, T, OH, OW] int64.

    The set rows of each plane are counted per tile as the crossbar maps the fan-in (the order of a
    flattened conv weight, channel-major): channels wholly inside a tile are summed first and their
    kernel windows counted by one box filter; a channel that a tile boundary splits adds a convolution
    with the 0/1 mask of its rows in that tile. Counts are small integers, exact in float32. Zero
    padding is part of a patch, as in the crossbar's im2col rows."""
    _, channels, kh, kw = weight_shape
    window = kh * kw
    fan_in = channels * window
    tile_rows = tile_row_counts(fan_in, rows)
    tiles = tile_rows.numel()
    n = levels.shape[0]
    magnitude = levels.abs().to(torch.int32)
    shifts = torch.arange(bits, device=levels.device, dtype=torch.int32).view(1, -1, 1, 1, 1)
    planes = ((magnitude.unsqueeze(1) >> shifts) & 1).to(levels.dtype)  # [N, Z, C, H, W]
    box = torch.ones(1, 1, kh, kw, dtype=levels.dtype, device=levels.device)

    def window_sum(plane: torch.Tensor, kernel: torch.Tensor | None) -> torch.Tensor:
        """[N, Z, H, W] -> [N, Z, OH, OW]: the sum over each patch's kernel window (kernel None: all of
        it, an average pool times its size, much faster than a one-channel convolution on a CPU)."""
        flat = plane.reshape(n * bits, 1, *plane.shape[-2:])
        if any(padding):
            flat = F.pad(flat, padding)
        if kernel is None and tuple(dilation) == (1, 1):
            out = F.avg_pool2d(flat, (kh, kw), stride=stride).mul_(window)
        else:
            out = F.conv2d(flat, box if kernel is None else kernel, stride=stride, dilation=dilation)
        return out.view(n, bits, *out.shape[-2:])

    def counts(plane: torch.Tensor) -> torch.Tensor:  # [N, Z, C, H, W] -> [N, Z, T, OH, OW]
        per_tile = []
        for t in range(tiles):
            first, last = t * rows, t * rows + int(tile_rows[t])  # the tile's fan-in rows [first, last)
            full_lo, full_hi = -(-first // window), last // window  # channels wholly inside
            total = None
            if full_hi > full_lo:
                total = window_sum(plane[:, :, full_lo:full_hi].sum(2), None)
            for c in {first // window, (last - 1) // window} - set(range(full_lo, full_hi)):
                mask = torch.zeros(window, dtype=levels.dtype, device=levels.device)
                mask[max(first - c * window, 0):min(last - c * window, window)] = 1
                part = window_sum(plane[:, :, c], mask.view(1, 1, kh, kw))
                total = part if total is None else total + part
            per_tile.append(total)
        return torch.stack(per_tile, dim=2)

    if bool((levels < 0).any()):
        count_pos = counts(planes * (levels > 0).unsqueeze(1))
        count_neg = counts(planes * (levels < 0).unsqueeze(1))
    else:
        count_pos = counts(planes)
        count_neg = torch.zeros_like(count_pos)
    real = tile_rows.to(levels.device, levels.dtype).view(1, 1, -1, 1, 1)
    return plane_class(count_pos.round(), count_neg.round(), real)


def linear_plane_classes(levels: torch.Tensor, bits: int, fan_in: int, rows: int) -> torch.Tensor:
    """levels [..., fan_in] -> [..., bits, T] plane classes of a linear layer's rows."""
    tile_rows = tile_row_counts(fan_in, rows)
    tiles = tile_rows.numel()
    pad = tiles * rows - fan_in
    x = F.pad(levels, (0, pad)) if pad else levels
    x = x.reshape(*levels.shape[:-1], tiles, rows)
    magnitude = x.abs().to(torch.int32)
    shifts = torch.arange(bits, device=levels.device, dtype=torch.int32)
    planes = ((magnitude.unsqueeze(-3) >> shifts.view(-1, 1, 1)) & 1).to(levels.dtype)  # [..., Z, T, S]
    count_pos = (planes * (x > 0).unsqueeze(-3)).sum(-1)
    count_neg = (planes * (x < 0).unsqueeze(-3)).sum(-1)
    return plane_class(count_pos, count_neg, tile_rows.to(levels.device, levels.dtype))
