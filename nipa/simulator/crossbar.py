"""Crossbar layers: the bit-and-crossbar slicing simulator, our ground truth (SPEC section 4).

`convert(model, hw)` returns a copy of a model whose mapped layers (see `nipa.hardware.mapping`) compute as an
analog PIM chip would: per-(channel, tile) weight quantization, sign-magnitude slices on differential
cell pairs with device errors, bit-serial inputs, one ADC read per (tile, input bit, slice) column,
shift-and-add in digital.

Speed: the original ran one small product per (input bit, slice, tile) in Python loops. On a CPU the
reads run in nipa's lookup kernel (`nipa.simulator.plane_lookup`: partial sums by table lookup, the ADC
fused, nothing written to memory). Elsewhere (GPUs, NIPA_LOOKUP=0, no C compiler) every tile of a layer
is one batch entry of a single `bmm`, the input bits are stacked along its rows and the slices along its
columns, so one layer is one product (or a few, when the partial sums would exceed the memory budget).
Nothing forces a device synchronization.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nipa.hardware.compat import NO_COMPAT, Compat
from nipa.hardware.config import HWConfig, PerLayerConfig
from nipa.hardware.device_errors import chip_generator, program_pairs
from nipa.hardware.mapping import as_linear, is_mappable, select_layers, set_submodule
from nipa.hardware.quant import (
    input_levels,
    input_scale,
    max_level,
    quantize_weight_tiles,
    slice_magnitude,
    tile_columns,
)
from nipa.simulator import plane_lookup

DEFAULT_MEMORY_MB = 1024

# ADC modes whose range spans every tile of a layer: splitting the tiles into chunks then needs a first
# pass over the partial sums to find the range (the other modes can split tiles freely).
_RANGE_ACROSS_TILES = ("dynamic",)
# Products run in bfloat16 when that is exact: cells and input bit planes are small integers, the
# backends accumulate in float32, and a bfloat16 result holds every integer up to 2^8 exactly.
_BF16_EXACT_LIMIT = 256
_RECOMPILE_LIMIT = 64  # compiled variants per kernel (see _Kernel)
_FAULT_STREAM = 2**31 - 1  # the per-read stream index that holds a chip's stuck-at masks


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable scratch tensor of at least `shape`, shared by all layers (they run one at a time).
    Reusing memory avoids the page faults of a fresh large tensor on every product."""
    key = (name, dtype, str(device))
    size = math.prod(shape)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = None  # drop the smaller buffer before allocating: holding both would add it to the peak
        _WORKSPACES.pop(key, None)
        buffer = torch.empty(size, dtype=dtype, device=device)
        _WORKSPACES[key] = buffer
    return buffer[:size].view(shape)


def release_workspaces() -> None:
    """Free the simulator's scratch memory."""
    _WORKSPACES.clear()


def _quantize_reads(partial: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, coefficient: torch.Tensor,
                    constant: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """ADC reads of partial sums [t, z, n, K, out] weighted and summed over the slices:
    V[t, z, n, out] = sum_k coefficient[., z, ., k] * index + constant[t, z], with
    index = clamp(round((P - lo) / step), 0, levels) (a no-op clamp for a dynamic range, which holds
    every read). A division, not a product with 1/step: a read exactly halfway between two levels must
    round half to even, and a float32 reciprocal that is not exact (a step of 14 or 28) would push such
    a tie up. Pure (no in-place), and `levels` a tensor, so that `torch.compile` fuses it into one pass
    over the partial sums with one compiled kernel for every ADC resolution."""
    index = torch.minimum(torch.round((partial.float() - lo) / step).clamp_min(0), levels)
    return (index * coefficient).sum(dim=3) + constant


def _quantize_reads_eager(partial: torch.Tensor, lo: torch.Tensor, step: torch.Tensor,
                          coefficient: torch.Tensor, constant: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`_quantize_reads` in place on one temporary (fresh large tensors cost page faults on CPU)."""
    index = partial.float().sub_(lo) if partial.dtype == torch.float32 else partial.float() - lo
    index.div_(step).round_().clamp_(0, float(levels))
    return index.mul_(coefficient).sum(dim=3).add_(constant)


def _read_range(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of partial sums [t, z, n, K, out] over the rows and columns: [t, z, 1, K, 1] (float32).
    The contiguous column axis is reduced first: compiled, one reduction over (rows, columns) walked the
    memory once per slice and was measured 2.6x slower (0.85 against 0.33 ns per partial sum). Widened to
    float32 first (exact; fused into the same pass): int32 reductions compile 10x slower."""
    values = partial.float()
    lo = values.amin(dim=-1, keepdim=True).amin(dim=2, keepdim=True)
    hi = values.amax(dim=-1, keepdim=True).amax(dim=2, keepdim=True)
    return lo, hi


def _read_range_eager(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Reduce the contiguous column axis first: measured faster here than one strided reduction or
    # torch.aminmax over the rows.
    lo = partial.amin(dim=-1, keepdim=True).amin(dim=2, keepdim=True)
    hi = partial.amax(dim=-1, keepdim=True).amax(dim=2, keepdim=True)
    return lo.float(), hi.float()


def _bit_planes(magnitude: torch.Tensor, sign: torch.Tensor, shifts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_z = sign * bit_z(|x|) for the bits `shifts` [z]: magnitude, sign [t, n, S] -> [t, z, n, S]."""
    bits = torch.bitwise_and(torch.bitwise_right_shift(magnitude.unsqueeze(1), shifts.view(1, -1, 1, 1)), 1)
    return (bits * sign.unsqueeze(1)).to(dtype).contiguous()


class _Kernel:
    """A pure tensor function run eagerly (the default) or compiled: NIPA_COMPILE=1 compiles it with
    torch.compile (inductor: C++/OpenMP on CPU, Triton on GPU), which fuses its passes over the partial
    sums. A failed compilation falls back to eager with a warning. `mode` says which ran last."""

    def __init__(self, name: str, pure, eager) -> None:
        self.name, self.pure, self.eager = name, pure, eager
        self._compiled = None
        self.mode = "eager"

    @staticmethod
    def wanted() -> bool:
        return os.environ.get("NIPA_COMPILE", "0") == "1"

    def __call__(self, *args):
        if self.wanted() and self.mode != "eager-fallback":
            try:
                if self._compiled is None:
                    # Sizes of 1 (one tile, one bit per chunk) and each sums' dtype are compiled apart:
                    # a sweep meets more variants than dynamo's default 8 per function, past which it
                    # would silently run the pure (not in-place) function eagerly, slow and memory-hungry.
                    import torch._dynamo.config as dynamo_config

                    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
                    self._compiled = torch.compile(self.pure, dynamic=True)
                result = self._compiled(*args)
                self.mode = "compiled"
                return result
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, say so once
                warnings.warn(f"torch.compile of {self.name} failed ({type(exc).__name__}: {exc}); "
                              "running it eagerly", stacklevel=2)
                self.mode = "eager-fallback"
        elif self.mode != "eager-fallback":
            self.mode = "eager"
        return self.eager(*args)


ADC_CHAIN = _Kernel("the ADC chain", _quantize_reads, _quantize_reads_eager)
READ_RANGE = _Kernel("the ADC range", _read_range, _read_range_eager)
BIT_PLANES = _Kernel("the input bit planes", _bit_planes, _bit_planes)


def compile_mode() -> str:
    """'compiled', 'eager' or 'eager-fallback': how the ADC chain ran last (recorded with results)."""
    return ADC_CHAIN.mode


_PRODUCTS_USED: set[str] = set()


def product_mode() -> str:
    """How this process's crossbar reads ran (recorded with results): 'lookup' (the CPU kernel,
    `plane_lookup`), 'matmul' (batched products and the ADC chain), or both joined by '+'; 'none' before
    the first read."""
    return "+".join(sorted(_PRODUCTS_USED)) or "none"


class CrossbarCore(nn.Module):
    """One weight matrix W [out, fan_in] programmed on crossbar tiles of `hw.subArray` rows."""

    def __init__(self, weight: torch.Tensor, hw: HWConfig, name: str = "", per_read: bool = False,
                 memory_mb: float = DEFAULT_MEMORY_MB, compat: Compat = NO_COMPAT) -> None:
        super().__init__()
        self.hw = hw
        self.name = name
        self.compat = compat
        self.per_read = per_read or compat.per_read
        self.memory_mb = memory_mb
        matrix = weight.detach().reshape(weight.shape[0], -1).float()
        self.out_features, self.fan_in = matrix.shape
        self.subarray_rows = hw.subArray
        # A layer whose fan-in is below the crossbar height uses only fan_in rows; the idle rows carry
        # no input, so leaving them out changes no read and saves the padding work.
        self.rows = min(hw.subArray, self.fan_in)
        self.num_tiles = math.ceil(self.fan_in / self.rows)
        # The last tile's rows that carry weights: its product skips the zero-padded rest (they add
        # nothing to any partial sum).
        self.last_tile_rows = self.fan_in - (self.num_tiles - 1) * self.rows
        self.num_slices = compat.num_slices(hw.wl_weight, hw.cellBit)
        q, scale = quantize_weight_tiles(tile_columns(matrix, self.rows), hw.wl_weight)
        self.register_buffer("weight_scale", scale)  # [out, T]
        slices = slice_magnitude(q, hw.wl_weight, hw.cellBit, self.num_slices)  # [K, out, T, rows]
        self.register_buffer("slices", slices)
        self.register_buffer("conductance", self._as_columns(self.slices))  # [T, rows, K*out]
        significance = [[2.0 ** z * 2.0 ** (hw.cellBit * k) for k in range(self.num_slices)]
                        for z in range(hw.wl_input - 1)]
        self.register_buffer("significance", torch.tensor(significance))  # [Z, K]
        # ADC range for the `calibrated` mode, per slice: [K, 2] (min, max); NaN until calibrated.
        self.register_buffer("adc_range", torch.full((self.num_slices, 2), float("nan")))
        self.register_buffer("levels_tensor", torch.tensor(float(2**hw.ADCprecision)), persistent=False)
        self.calibrating = False
        self.calibrated = False
        self.chip_seed: tuple[int, int] | None = None
        self.read_calls = 0  # forward calls since programming: the per-read error stream of each call
        self.exact_integer_cells = True  # cells hold the integer slices: low-precision products are exact

    @staticmethod
    def _as_columns(pairs: torch.Tensor) -> torch.Tensor:
        """[..., K, out, T, rows] -> [..., T, rows, K*out]: the right operand of the tile product."""
        k, out, t, rows = pairs.shape[-4:]
        lead = pairs.shape[:-4]
        moved = pairs.movedim(-2, -4).movedim(-1, -3)  # [..., T, rows, K, out]
        return moved.reshape(*lead, t, rows, k * out).contiguous()  # rows of cells contiguous (plane_lookup)

    def _layer_id(self) -> int:
        return zlib.crc32(self.name.encode())

    def program(self, seed: int, chip: int) -> None:
        """Draw this layer's device errors for one chip (fixed until the next call)."""
        self.chip_seed = (seed, chip)
        self.read_calls = 0
        if self.per_read:
            # Errors are redrawn on every read (see _read_columns); the stored pairs stay ideal.
            self.conductance = self._as_columns(self.slices)
            self.exact_integer_cells = not self.hw.has_device_error
            return
        generator = chip_generator(seed, chip, self._layer_id())
        pairs = program_pairs(self.slices.cpu(), self.hw, generator, self.compat).to(self.slices.device)
        self.conductance = self._as_columns(pairs)
        self.exact_integer_cells = not self.hw.has_device_error

    # ---- the analog product -------------------------------------------------------------------

    def _read_columns(self, call: int, tiles: slice, bits: range) -> torch.Tensor:
        """Per-read device error: fresh cells for every (forward call, input bit), drawn for the whole
        layer from a stream of their own, so that chunking the product never changes a draw:
        [t, z, rows, K*out]."""
        seed, chip = self.chip_seed if self.chip_seed is not None else (0, 0)
        device = self.slices.device
        per_bit = []
        for bit in bits:
            generator = chip_generator(seed, chip, self._layer_id(), device, call, bit)
            # Stuck-at faults are permanent: the same masks on every read (the chip's own stream).
            faults = chip_generator(seed, chip, self._layer_id(), device, _FAULT_STREAM)
            pairs = program_pairs(self.slices, self.hw, generator, self.compat, faults)
            per_bit.append(self._as_columns(pairs)[tiles])
        return torch.stack(per_bit, dim=1)

    def _columns_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The programmed columns in the product's dtype, converted once per programming (the cache
        follows the buffer: a new or modified `conductance` is converted again)."""
        if dtype == self.conductance.dtype:
            return self.conductance
        source = self.conductance
        cached = getattr(self, "_columns_cache", None)
        # The cache holds its source tensor, so a new buffer can never reuse the address of the old one.
        if cached is None or cached[0] is not source or cached[1] != (dtype, source._version):
            cached = (source, (dtype, source._version), source.to(dtype))
            self._columns_cache = cached
        return cached[2]

    def _product_dtype(self) -> torch.dtype:
        """The product format: the first of bfloat16 (integer cells, every partial sum within 2^8), int8
        on CPUs (integer cells within int8, int32 sums, any rows) and float32 that is exact here and was
        timed faster than float32 on this device (`_product_seconds`). bfloat16 comes before int8: on
        this project's CPU (AVX-512 BF16/VNNI) int8 products ran faster in cache, but their int32 sums
        are twice the bytes, and SmallCNN's layers took as long or longer in int8 (conv2 0.62 s against
        0.49 s). NIPA_BF16=0 / NIPA_INT8=0 leave a format out."""
        if not self.exact_integer_cells or self.per_read:
            return torch.float32
        device = self.slices.device
        candidates = []
        if self.rows * (2**self.hw.cellBit - 1) <= _BF16_EXACT_LIMIT and os.environ.get("NIPA_BF16", "1") == "1":
            candidates.append(torch.bfloat16)
        if device.type == "cpu" and 2**self.hw.cellBit - 1 <= 127 and os.environ.get("NIPA_INT8", "1") == "1":
            candidates.append(torch.int8)
        if not candidates:
            return torch.float32
        seconds = _product_seconds(device)
        return next((dtype for dtype in candidates if seconds[dtype] < math.inf), torch.float32)

    def _partial_sums(self, magnitude: torch.Tensor, sign: torch.Tensor, tiles: slice, bits: range,
                      rows: slice, call: int) -> torch.Tensor:
        """P[t, z, n, k, out] = sum_r x_z[n, t, r] * (G_pos - G_neg)[k, out, t, r]."""
        mag = magnitude[rows, tiles].permute(1, 0, 2)  # [t, n, S]
        sgn = sign[rows, tiles].permute(1, 0, 2)
        t, n, s = mag.shape
        z = len(bits)
        if self._looks_up(magnitude, n * z):
            partial = _workspace("partial", (t, z, n, self.num_slices * self.out_features), torch.float32,
                                 magnitude.device)
            plane_lookup.partial_sums(magnitude, sign, self.conductance.contiguous(), range(tiles.start, tiles.stop),
                                      rows, bits, self.last_tile_rows, partial)  # contiguous already unless replaced
            return partial.view(t, z, n, self.num_slices, self.out_features)
        dtype = self._product_dtype()
        split = dtype == torch.float32 and self._splits_cells()
        if split:
            dtype = torch.int8  # the bit planes of the int8 parts' products
        if dtype == torch.int8:
            sgn = sgn.to(torch.int8)  # integer bit planes: an int32 x float product cannot be written to int8
        if _Kernel.wanted():
            planes = BIT_PLANES(mag, sgn, torch.arange(bits.start, bits.stop, device=mag.device, dtype=mag.dtype),
                                 dtype)
        else:
            planes = _workspace("planes", (t, z, n, s), dtype, sgn.device)
            bit_buffer = _workspace("bit", (t, n, s), mag.dtype, mag.device)
            for index, bit in enumerate(bits):
                torch.bitwise_right_shift(mag, bit, out=bit_buffer).bitwise_and_(1)
                torch.mul(bit_buffer, sgn, out=planes[:, index])
        if self.per_read:
            columns = self._read_columns(call, tiles, bits)  # [t, z, S, K*out]
            partial = torch.matmul(planes, columns)  # [t, z, n, K*out]
        elif split:
            partial = self._split_product(planes.view(t, z * n, s), tiles)
        else:
            columns = self._columns_as(dtype)[tiles]
            sum_dtype = _SUM_DTYPE.get(dtype, dtype)
            partial = _workspace("partial", (t, z * n, self.num_slices * self.out_features), sum_dtype,
                                 planes.device)
            flat = planes.view(t, z * n, s)
            # A short last tile is multiplied over its real rows only (smallcnn conv2: 16 of 128 rows).
            short = tiles.stop == self.num_tiles and self.last_tile_rows < self.rows
            full = t - 1 if short else t
            if full:
                _tile_product(flat[:full], columns[:full], partial[:full])  # [t, z*n, K*out]
            if short:
                real = self.last_tile_rows
                _tile_product(flat[full:, :, :real], columns[full:, :real], partial[full:])
            if sum_dtype != torch.float32 and not _Kernel.wanted():
                # Eager element-wise passes are slow on bfloat16 and int32 (each converts): widen once (exact).
                widened = _workspace("partial_float", partial.shape, torch.float32, partial.device)
                partial = widened.copy_(partial)
        return partial.view(t, z, n, self.num_slices, self.out_features)

    def _looks_up(self, magnitude: torch.Tensor, reads_per_tile: int) -> bool:
        """Whether this product takes the CPU lookup kernel (`plane_lookup`): cells programmed once per
        chip (any values), input magnitudes within 8 bits, enough reads to pay for the tables."""
        return (magnitude.dtype == torch.uint8 and self._lookup_enabled() and plane_lookup.worth_it(reads_per_tile))

    def _lookup_enabled(self) -> bool:
        return (self.slices.device.type == "cpu" and not self.per_read and self.hw.wl_input <= 9
                and self.conductance.dtype == torch.float32 and plane_lookup.available())

    def _splits_cells(self) -> bool:
        """Float cells (device error) computed as three int8 parts (`_split_columns`): opt-in with
        NIPA_SPLIT=1, on a CPU where int8 products were timed at least 4x faster than float32. Not the
        default: on this project's CPU the three-part int8 product alone ran 1.7x faster than float32,
        but with the eager recombination SmallCNN's layers took longer (conv3 0.85 s against 0.55 s,
        conv1, 9 rows, 0.74 s against 0.23 s)."""
        if self.per_read or self.slices.device.type != "cpu" or os.environ.get("NIPA_SPLIT", "0") != "1":
            return False
        seconds = _product_seconds(self.slices.device, raw=True)
        return 4 * seconds[torch.int8] < seconds[torch.float32]

    def _split_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cells as three int8 parts, G = s (h0 + h1 / 2^7 + h2 / 2^14) per (tile, column), s the
        power of two with max |G| / s <= 127 over the column's rows: [T, rows, 3 * K*out] int8 and the
        three scales [T, 1, 3 * K*out]. Powers of two keep every scaling exact, so a cell on a grid of
        2^-14 s or coarser (the benchmark's 2^-10 snapped cells) is held exactly; any other to within
        2^-15 s, at most 2^-21 of the column's largest cell. Cached per programming, like `_columns_as`."""
        source = self.conductance
        cached = getattr(self, "_split_cache", None)
        if cached is not None and cached[0] is source and cached[1] == source._version:
            return cached[2]
        largest = source.abs().amax(dim=1, keepdim=True).clamp_min(2.0**-100)  # [T, 1, C]
        scale = torch.exp2(torch.ceil(torch.log2(largest / 127)))
        scale = torch.where(largest / scale > 127, scale * 2, scale)  # log2 rounding at the boundary
        scaled = source / scale
        parts = []
        for _ in range(3):
            digit = torch.round(scaled)
            parts.append(digit)
            scaled = (scaled - digit) * 128
        columns = torch.cat(parts, dim=2).clamp_(-127, 127).to(torch.int8)
        scales = torch.cat([scale, scale / 128, scale / 16384], dim=2)
        self._split_cache = (source, source._version, (columns, scales))
        return columns, scales

    def _split_product(self, planes: torch.Tensor, tiles: slice) -> torch.Tensor:
        """Float32 partial sums [t, z*n, K*out] from the int8 parts: per tile and block of rows, one
        int8 product of the three parts side by side (int32 sums, exact), then s0 P0 + s1 P1 + s2 P2 in
        float32 on the block while it is in cache (each scaling exact, two roundings: within float32
        rounding of the exact sum of the parts' products)."""
        columns, scales = self._split_columns()
        width = self.num_slices * self.out_features
        t, m, _ = planes.shape
        partial = _workspace("partial", (t, m, width), torch.float32, planes.device)
        block_rows = max(16, (4 << 20) // (3 * width * 4))  # int32 sums of about 4 MB
        block = _workspace("split_block", (block_rows, 3 * width), torch.int32, planes.device)
        for offset, tile in enumerate(range(tiles.start, tiles.stop)):
            real = self.last_tile_rows if tile == self.num_tiles - 1 else self.rows
            parts, scale = columns[tile, :real], scales[tile, 0]
            for r0 in range(0, m, block_rows):
                r1 = min(m, r0 + block_rows)
                sums = block[: r1 - r0]
                torch._int_mm(planes[offset, r0:r1, :real], parts, out=sums)
                target = partial[offset, r0:r1]
                torch.mul(sums[:, :width], scale[:width], out=target)
                target.addcmul_(sums[:, width:2 * width], scale[width:2 * width])
                target.addcmul_(sums[:, 2 * width:], scale[2 * width:])
        return partial

    def _chunking(self, n: int) -> tuple[int, int, int]:
        """Tiles, bits and rows per product so that the live tensors (`_bytes_per_read`) stay within the
        memory budget. Input bits split first (every
        mode ranges each bit on its own); then tiles where the ADC range allows it, then the rows (a
        range that spans them then costs a first pass)."""
        budget = max(1, int(self.memory_mb * 2**20))
        per_row = self._bytes_per_read()
        bits, tiles = self.hw.wl_input - 1, self.num_tiles
        if tiles * n * per_row <= budget:
            return tiles, max(1, min(bits, budget // (tiles * n * per_row))), n
        if self.hw.adc_mode in _RANGE_ACROSS_TILES and not self.calibrating:
            tile_chunk = tiles if tiles * per_row <= budget else max(1, budget // per_row)
        else:
            tile_chunk = max(1, min(tiles, budget // (n * per_row)))
        row_chunk = max(1, min(n, budget // (tile_chunk * per_row)))
        return tile_chunk, 1, row_chunk

    def _bytes_per_read(self) -> int:
        """Live bytes per (tile, batch row, input bit) of one product: the partial sums in the product's
        dtype, the eager ADC chain's float32 copy of bfloat16 sums (float32 ones are quantized in
        place), the per-read sums over the slices and the input bit plane."""
        columns = self.num_slices * self.out_features
        if self._lookup_enabled():  # float32 sums, no bit planes
            return 4 * columns + 4 * self.out_features
        dtype = self._product_dtype()
        size = torch.empty((), dtype=_SUM_DTYPE.get(dtype, dtype)).element_size()
        widened = 4 * columns if dtype != torch.float32 and not _Kernel.wanted() else 0
        plane = torch.empty((), dtype=dtype).element_size() * self.rows
        return size * columns + widened + 4 * self.out_features + plane

    def _range(self, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range (lo, hi) that this mode takes over one chunk of partial sums [t, z, n, K, out]:
        dynamic [1, z, 1, K, 1] (all tiles, rows and columns), dynamic_tile [t, z, 1, K, 1]."""
        lo, hi = READ_RANGE(partial)
        if self.hw.adc_mode == "dynamic":
            lo, hi = lo.amin(dim=0, keepdim=True), hi.amax(dim=0, keepdim=True)
        return lo, hi

    def adc_range_of(self, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ADC range (lo, hi) of partial sums [t, z, n, K, out] that hold every tile and row of the
        layer's reads, broadcastable to [t, z, 1, K, 1]."""
        hw = self.hw
        t, z = partial.shape[:2]
        if hw.adc_mode in ("dynamic", "dynamic_tile"):
            return self._range(partial)
        if hw.adc_mode == "calibrated":
            lo = self.adc_range[:, 0].view(1, 1, 1, -1, 1).expand(t, z, 1, -1, 1)
            hi = self.adc_range[:, 1].view(1, 1, 1, -1, 1).expand(t, z, 1, -1, 1)
            return lo, hi
        # full: the physical full scale of a column, every row at the top level, inputs of either sign
        full = partial.new_full((t, z, 1, self.num_slices, 1), float(self.subarray_rows * (2**hw.cellBit - 1)),
                                dtype=torch.float32)
        return -full, full

    def adc(self, partial: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """ADC read of partial sums: lo + step * clamp(round((P - lo) / step), 0, 2^a_r),
        step = (hi - lo) / 2^a_r; a read whose range is a single value returns it unchanged."""
        levels = 2**self.hw.ADCprecision
        step = (hi - lo) / levels
        divisor = torch.where(step > 0, step, torch.ones_like(step))
        # The same operations, in the same order, as the fast path in _read_shift_add.
        index = (partial.float() - lo).div_(divisor).round_().clamp_(0, levels)
        return torch.where(step > 0, lo + index * step, partial.float())

    def _adc(self, partial: torch.Tensor) -> torch.Tensor:
        """One full ADC read of partial sums [t, z, n, K, out] holding every tile and row of the layer
        (used by tests)."""
        return self.adc(partial, *self.adc_range_of(partial))

    def _read_shift_add(self, partial: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None,
                        bits: range) -> torch.Tensor:
        """sum_k 2^z 2^(ck) ADC(P_{t,z,k}) -> V[t, z, n, out] (the per-tile scale is applied by the caller).

        ADC(P) = lo + step * index, so the sum splits into the indices weighted by 2^z 2^(ck) step and a
        constant per (tile, bit). Without a range (lo is None: calibration) the partial sums pass
        unquantized.
        """
        t, z = partial.shape[:2]
        if lo is None:
            weights = self.significance[bits.start:bits.stop].view(1, z, 1, -1, 1)  # [1, z, 1, K, 1]
            return (partial.float() * weights).sum(dim=3)
        lo, divisor, coefficient, constant = self._adc_terms(lo, hi, bits, t)
        return ADC_CHAIN(partial, lo, divisor, coefficient, constant, self.levels_tensor)

    def _adc_terms(self, lo: torch.Tensor, hi: torch.Tensor, bits: range, t: int):
        """ADC(P) = lo + step * index: the read's (lo, divisor, coefficient) [t, z, 1, K, 1] and constant
        [t, z, 1, 1] for ranges broadcastable to [t, z, 1, K, 1], index weighted by 2^z 2^(ck) step."""
        z = len(bits)
        weights = self.significance[bits.start:bits.stop].view(1, z, 1, -1, 1)  # [1, z, 1, K, 1]
        levels = 2**self.hw.ADCprecision
        lo = lo.expand(t, z, 1, -1, 1)
        step = (hi.expand(t, z, 1, -1, 1) - lo) / levels
        # A constant read (step 0) has P == lo everywhere: index 0 gives it back exactly.
        divisor = torch.where(step > 0, step, torch.ones_like(step))
        coefficient = weights * step
        constant = (weights * lo).sum(dim=3)  # [t, z, 1, 1]
        return lo, divisor, coefficient, constant

    @torch.no_grad()  # rounding at every step: nothing to differentiate, and no graph to keep
    def forward(self, x: torch.Tensor, scale_in: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, fan_in] -> y [n, out] as the chip computes it (bias not included). `scale_in`: the
        per-tensor input scale when x is not the whole layer input (a convolution's im2col rows).

        The result does not depend on the memory budget: the rows are independent, ranges are exact
        minima and maxima, and the per-(tile, bit) sums are added to the output in one fixed order
        (bits outer, tiles inner) whatever the chunks."""
        hw = self.hw
        if hw.adc_mode == "calibrated" and not (self.calibrated or self.calibrating):
            raise RuntimeError(f"layer {self.name}: ADC mode 'calibrated' needs "
                               "calibrate_adc(model, batches) before the first evaluation")
        if x.is_floating_point():
            x = x.float()
            if scale_in is None:
                scale_in = input_scale(x, hw.wl_input)
            x = input_levels(x, hw.wl_input, scale_in)
        elif scale_in is None:
            raise ValueError(f"layer {self.name}: integer input levels need their scale_in")
        levels = max_level(hw.wl_input)
        x_tiles = tile_columns(x, self.rows)  # [n, T, S] integer levels
        # The narrowest integers that hold them: with the im2col rows these are the largest tensors
        # outside the product budget (SmallCNN conv2 at batch 256: 51 MB each as int32/float32).
        magnitude = x_tiles.abs().to(torch.uint8 if levels <= 255 else torch.int32)
        sign = torch.sign(x_tiles).to(torch.int8)
        del x_tiles
        n = x.shape[0]
        call = self.read_calls
        self.read_calls += 1
        if not self.calibrating and self._looks_up(magnitude, n * (hw.wl_input - 1)):
            _PRODUCTS_USED.add("lookup")
            return self._lookup_forward(magnitude, sign, n) * scale_in
        _PRODUCTS_USED.add("matmul")
        tile_chunk, bit_chunk, row_chunk = self._chunking(n)
        num_bits = hw.wl_input - 1
        tile_slices = [slice(t0, min(self.num_tiles, t0 + tile_chunk)) for t0 in range(0, self.num_tiles, tile_chunk)]
        row_slices = [slice(r0, r0 + row_chunk) for r0 in range(0, n, row_chunk)]
        dynamic = hw.adc_mode in ("dynamic", "dynamic_tile") and not self.calibrating
        # A dynamic range spans chunks that are computed apart: find it in a first pass.
        first_pass = dynamic and (len(row_slices) > 1 or (hw.adc_mode == "dynamic" and len(tile_slices) > 1))
        scale_rows = self.weight_scale.t().contiguous()  # [T, out]
        out = torch.zeros(n, self.out_features, dtype=torch.float32, device=x.device)
        for z0 in range(0, num_bits, bit_chunk):
            bits = range(z0, min(num_bits, z0 + bit_chunk))
            ranges: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            if first_pass:
                for tiles in tile_slices:
                    for rows in row_slices:
                        lo, hi = self._range(self._partial_sums(magnitude, sign, tiles, bits, rows, call))
                        key = 0 if hw.adc_mode == "dynamic" else tiles.start
                        if key in ranges:
                            lo, hi = torch.minimum(ranges[key][0], lo), torch.maximum(ranges[key][1], hi)
                        ranges[key] = (lo, hi)
            for tiles in tile_slices:
                for rows in row_slices:
                    partial = self._partial_sums(magnitude, sign, tiles, bits, rows, call)
                    if self.calibrating:
                        self._record_range(partial)
                        lo = hi = None
                    elif first_pass:
                        lo, hi = ranges[0 if hw.adc_mode == "dynamic" else tiles.start]
                    else:
                        lo, hi = self.adc_range_of(partial)
                    per_read = self._read_shift_add(partial, lo, hi, bits)  # [t, z, n, out]
                    del partial
                    for index in range(len(bits)):
                        for offset, tile in enumerate(range(tiles.start, tiles.stop)):
                            out[rows].addcmul_(per_read[offset, index], scale_rows[tile])
            if len(tile_slices) > 1:
                # Keep the order bits outer, tiles inner with tiles split: one bit per chunk (see _chunking).
                assert len(bits) == 1
        return out * scale_in

    def _lookup_forward(self, magnitude: torch.Tensor, sign: torch.Tensor, n: int) -> torch.Tensor:
        """`forward` with the lookup kernel's fused reads (`plane_lookup.adc_reads`): the partial sums
        are never written to memory. A dynamic range takes a first pass over them (`read_range`); the
        reads then run over blocks of rows whose per-(tile, bit) sums fit the memory budget, added to
        the output in forward's order (bits outer, tiles inner)."""
        hw = self.hw
        tiles, bits, rows = range(self.num_tiles), range(hw.wl_input - 1), slice(0, n)
        columns = self._vector_slice_columns()
        shape = (self.num_tiles, len(bits), 1, self.num_slices, 1)
        if hw.adc_mode in ("dynamic", "dynamic_tile"):
            lo, hi = plane_lookup.read_range(magnitude, sign, columns, tiles, rows, bits, self.last_tile_rows,
                                             self.num_slices, self.out_features)  # [T, Z, K]
            if hw.adc_mode == "dynamic":
                lo, hi = lo.amin(dim=0, keepdim=True), hi.amax(dim=0, keepdim=True)
            lo, hi = lo.unsqueeze(2).unsqueeze(-1), hi.unsqueeze(2).unsqueeze(-1)
        else:
            probe = torch.empty(shape, device=magnitude.device)  # adc_range_of reads only its shape
            lo, hi = self.adc_range_of(probe)
        lo, divisor, coefficient, constant = self._adc_terms(lo, hi, bits, self.num_tiles)
        flat = (self.num_tiles, len(bits), self.num_slices)
        padded = columns.shape[-1] // self.num_slices  # outputs per read, padded to 16
        row_chunk = max(1, int(self.memory_mb * 2**20) // (self.num_tiles * len(bits) * padded * 4))
        scale_rows = self.weight_scale.t().float().contiguous()  # [T, out]
        constant = constant.reshape(flat[:2]).float().contiguous()
        out = torch.zeros(n, self.out_features, dtype=torch.float32, device=magnitude.device)
        for r0 in range(0, n, row_chunk):
            block = slice(r0, min(n, r0 + row_chunk))
            scratch = _workspace("lookup-reads", (*flat[:2], block.stop - r0, padded), torch.float32, magnitude.device)
            plane_lookup.adc_reads(magnitude, sign, columns, tiles, block, bits, self.last_tile_rows,
                                   self.num_slices, self.out_features, lo.reshape(flat), divisor.reshape(flat),
                                   coefficient.reshape(flat), 2**hw.ADCprecision, out=scratch)
            # out += (reads + constant) * scale per (bit, tile), bits outer: one pass over the reads.
            plane_lookup.shift_add(scratch, constant, scale_rows, out[block])
        return out

    def _vector_slice_columns(self) -> torch.Tensor:
        """The cells in the lookup kernel's vector-slice order, built per forward and not kept: a copy
        held per layer would double the simulator's largest data (ResNet-18: 299 MB of cells), and
        building it costs under 1% of a forward (39 ms of ResNet-18's 4.5 s at batch 16)."""
        return plane_lookup.vector_slice_columns(self.conductance.float(), self.num_slices)

    def _record_range(self, partial: torch.Tensor) -> None:
        lo = partial.amin(dim=(0, 1, 2, 4)).float()
        hi = partial.amax(dim=(0, 1, 2, 4)).float()
        current = self.adc_range
        self.adc_range = torch.stack([torch.fmin(current[:, 0], lo), torch.fmax(current[:, 1], hi)], 1)


_PRODUCT_SECONDS: dict[str, dict[torch.dtype, float]] = {}
# The sums' dtype of a product format (int8 products accumulate and return int32).
_SUM_DTYPE = {torch.int8: torch.int32}


def _tile_product(planes: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] = planes[t] @ columns[t] for [t, m, s] x [t, s, c]: one bmm, or per tile for int8 (whose
    `torch._int_mm` is two-dimensional)."""
    if planes.dtype == torch.int8:
        for tile in range(planes.shape[0]):
            torch._int_mm(planes[tile], columns[tile], out=out[tile])
    elif planes.dim() == 2:
        torch.mm(planes, columns, out=out)
    else:
        torch.bmm(planes, columns, out=out)


_RAW_PRODUCT_SECONDS: dict[str, dict[torch.dtype, float]] = {}


def _product_seconds(device: torch.device, raw: bool = False) -> dict[torch.dtype, float]:
    """Seconds of one tile product of crossbar shape (128 rows of {-1, 0, 1} inputs) per format, timed
    once per device: bfloat16 pays on CUDA and on CPUs with bfloat16 units (AVX-512 BF16 / AMX) and is
    emulated and slower elsewhere; int8 (CPU only) pays where VNNI/AMX-INT8 kernels run."""
    key = str(device)
    if key not in _PRODUCT_SECONDS:
        if device.type == "cuda":  # bfloat16 tensor cores; int8 is not used on CUDA
            _PRODUCT_SECONDS[key] = {torch.float32: 1.0, torch.bfloat16: 0.5, torch.int8: math.inf}
        else:
            # Sums of 4 MB per tile, beyond the caches as a layer's are; the fastest of 5 runs after two
            # warm-ups (the first call of a format builds its kernels; the minimum ignores other load).
            planes = torch.randint(-1, 2, (4, 2048, 128), device=device)
            columns = torch.randint(-1, 2, (4, 128, 448), device=device)
            seconds = {}
            for dtype in (torch.float32, torch.bfloat16, torch.int8):
                x, y = planes.to(dtype), columns.to(dtype)
                out = torch.empty(4, 2048, 448, dtype=_SUM_DTYPE.get(dtype, dtype), device=device)
                runs = []
                for _ in range(7):
                    started = time.perf_counter()
                    _tile_product(x, y, out)
                    runs.append(time.perf_counter() - started)
                seconds[dtype] = min(runs[2:])
            _RAW_PRODUCT_SECONDS[key] = dict(seconds)
            # A format must be clearly faster than float32 to be taken (timing noise on a loaded machine).
            for dtype in (torch.bfloat16, torch.int8):
                if seconds[dtype] > 0.8 * seconds[torch.float32]:
                    seconds[dtype] = math.inf
            _PRODUCT_SECONDS[key] = seconds
    if raw:
        return _RAW_PRODUCT_SECONDS.get(key, _PRODUCT_SECONDS[key])
    return _PRODUCT_SECONDS[key]


def product_formats(device: torch.device | str = "cpu") -> dict[str, float]:
    """The timed seconds per product format on `device` (inf: not faster than float32), for records."""
    return {str(dtype).removeprefix("torch."): value for dtype, value in _product_seconds(torch.device(device)).items()}


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
        # Quantized before im2col (the same levels, see input_levels); the core takes integer rows as levels.
        levels = input_levels(x, self.core.hw.wl_input, scale_in)
        if any(self.padding):
            levels = F.pad(levels, self.padding)
        rows = im2col(levels, self.kernel_size, self.stride, self.dilation)  # [N, L, C*kh*kw]
        batch, positions = rows.shape[:2]
        out_h = (levels.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
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
    hw: HWConfig | PerLayerConfig,
    *,
    exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
    seed: int = 0,
    chip: int = 0,
    per_read: bool = False,
    memory_mb: float = DEFAULT_MEMORY_MB,
    compat: Compat = NO_COMPAT,
) -> nn.Module:
    """A copy of `model` whose mapped layers run on crossbars configured by `hw`, programmed as chip
    number `chip` of seed `seed`. The input model is left untouched. `compat` switches on choices of
    the original tool (`nipa.hardware.compat`). A PerLayerConfig gives every mapped layer its own effective
    point (`for_layer`); a layer pattern that matches no mapped layer is a ConfigError."""
    options = {"per_read": per_read, "memory_mb": memory_mb, "compat": compat}
    if is_mappable(model):  # a bare layer converts to its crossbar twin
        if isinstance(hw, PerLayerConfig):
            hw.check_layers([""])
        converted = _crossbar_layer(as_linear(copy.deepcopy(model)), _layer_config(hw, ""), "", options)
    else:
        converted = copy.deepcopy(model)
        names = select_layers(model, exclude=exclude, include=include)
        if compat.digital_classifier:
            names = [name for name in names if name != final_classifier(model)]
        if isinstance(hw, PerLayerConfig):
            hw.check_layers(names)
        for name in names:
            layer = as_linear(converted.get_submodule(name))  # a transformers Conv1D: its nn.Linear twin
            set_submodule(converted, name, _crossbar_layer(layer, _layer_config(hw, name), name, options))
    program_chip(converted, seed, chip)
    return converted


def final_classifier(model: nn.Module) -> str | None:
    """The name of the last nn.Linear of a model (a CNN's classifier), None when it has none."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def _layer_config(hw: HWConfig | PerLayerConfig, name: str) -> HWConfig:
    """The effective hardware point of mapped layer `name`."""
    return hw.for_layer(name) if isinstance(hw, PerLayerConfig) else hw


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
