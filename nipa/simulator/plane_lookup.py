"""Table-lookup partial sums for the crossbar simulator on CPU (`plane_lookup.c`).

A crossbar read multiplies a {-1, 0, 1} input bit plane by the cells. Four input rows can only select one
of 16 sums of their cells, so the C kernel tabulates those sums once per (tile, block of columns) and
adds one table row per group of four rows with a set bit: for 128-row tiles at most 32 vector additions
per partial sum instead of 128 multiply-adds, and fewer where the planes are sparse. It holds any cells
(device errors included) in float32; with integer cells every sum is exact.

The kernel is compiled at first use (`nipa.native`: the system C compiler, -O3 -march=native, cached in
`$NIPA_CACHE_DIR`, else ~/.cache/nipa). Where no compiler works the simulator falls back to its batched
products with a warning; NIPA_LOOKUP=0 turns the kernel off. It runs on Python threads (ctypes releases
the GIL), one task per (tile, block of rows), each task's outputs summed by one thread in a fixed order:
the result does not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from pathlib import Path

import torch

from nipa import native

_SOURCE = Path(__file__).with_name("plane_lookup.c")
_GROUP, _PATTERNS = 4, 16
_VECTORS = (16, 8, 4, 2)  # column blocks of 16 x vectors floats the kernel is built for
_MIN_READS = 64  # below this many (row, bit) reads per tile the table costs more than it saves

_scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_scratch.clear)  # the parent's threads' scratch


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel; `extra_flags` builds a variant (tests)."""
    library = native.build(_SOURCE, extra_flags)
    function = library.plane_lookup
    function.restype = ctypes.c_int
    pointer, long, integer = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    function.argtypes = ([pointer, pointer, long, pointer] + [long] * 8
                         + [pointer, long, integer, pointer, pointer, long, integer, long, long, pointer,
                            ctypes.c_float, pointer])
    library.shift_add.restype = None
    library.shift_add.argtypes = [pointer] * 4 + [long] * 7
    return library


_kernel = native.Kernel(lambda: _build(), "NIPA_LOOKUP",
                        "the crossbar simulator's lookup kernel is unavailable ({reason}); products run as "
                        "batched matrix products (slower)")


def available() -> bool:
    """True when the kernel is enabled and compiled (compiling it on the first call)."""
    return _kernel.available()


def _l2_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 1 << 20


def _vectors(rows: int, columns: int) -> int:
    """Column block (in 16-float vectors) whose table fills at most an eighth of the L2 cache: the
    widest block that keeps most lookups near L1 (for 128-row tiles on a 1 MB L2, 64 columns; measured
    11% faster on ResNet-18 than blocks of 256 columns filling half of it, 8% on SmallCNN)."""
    groups = -(-rows // _GROUP)
    budget = _l2_bytes() // 8
    needed = -(-columns // 16)
    for vectors in _VECTORS:
        if groups * _PATTERNS * 16 * vectors * 4 <= budget and (vectors <= needed or vectors == _VECTORS[-1]):
            return vectors
    return _VECTORS[-1]


def worth_it(reads_per_tile: int) -> bool:
    """Whether a product of this many (row, bit) reads per tile should take the kernel."""
    return reads_per_tile >= _MIN_READS


def _thread_scratch(floats: int, ints: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's table (64-byte aligned for the vector loads) and read lists."""
    ident = threading.get_ident()
    table, lists = _scratch.get(ident, (None, None))
    if table is None or table.numel() < floats + 16:
        table = torch.empty(floats + 16, dtype=torch.float32)
    if lists is None or lists.numel() < ints:
        lists = torch.empty(ints, dtype=torch.int32)
    _scratch[ident] = (table, lists)
    offset = (-table.data_ptr() // 4) % 16
    return table[offset:offset + floats], lists


_SUMS, _RANGE, _READ = 0, 1, 2  # the kernel's modes
_MODE_NAMES = {_SUMS: "sums", _RANGE: "range", _READ: "reads"}


def _run(mode: int, magnitude: torch.Tensor, sign: torch.Tensor, columns: torch.Tensor, tiles: range,
         rows: slice, bits: range, last_tile_rows: int, slices: int = 0, out_features: int = 0,
         out: torch.Tensor | None = None, adc: torch.Tensor | None = None, levels: float = 0.0) -> torch.Tensor | None:
    """One kernel call per (tile, block of rows) task on the worker threads; see the public functions."""
    if not available():
        raise RuntimeError("the lookup kernel is not available")
    n, num_tiles, subarray = magnitude.shape
    if magnitude.dtype != torch.uint8 or sign.dtype != torch.int8 or columns.dtype != torch.float32:
        raise TypeError("the lookup kernel takes uint8 magnitudes, int8 signs and float32 cells")
    if not (magnitude.is_contiguous() and sign.is_contiguous() and columns.is_contiguous()):
        raise ValueError("the lookup kernel needs contiguous inputs and cells")
    if out is not None and not out.is_contiguous():
        raise ValueError("the lookup kernel needs a contiguous output")
    width = columns.shape[-1]
    r0, r1 = _row_span(magnitude, rows)
    num_rows = r1 - r0
    vectors = _vectors(subarray, width)
    groups = -(-subarray // _GROUP)
    blocks = -(-width // (16 * vectors))
    table_floats = blocks * groups * _PATTERNS * 16 * vectors  # every column block's table of one tile
    # Read lists of as many rows as fill a quarter of L2: every block of columns (whose table fills half
    # of it) is then fetched once per block of rows.
    per_row = len(bits) * (2 * groups + 2)
    row_block = max(16, min(4096, _l2_bytes() // 4 // (4 * per_row)))
    list_ints = row_block * per_row
    workers = native.workers()
    # Tasks of whole tiles when there are 4 per worker (a balanced share), else tiles split into blocks of
    # rows (each block rebuilds its tile's tables: a few rows' worth of additions).
    pieces = max(1, min(-(-4 * workers // len(tiles)), num_rows // 256 or 1))
    tasks = [(tile, r0 + k * num_rows // pieces, r0 + (k + 1) * num_rows // pieces)
             for tile in tiles for k in range(pieces)]
    ranges = None
    if mode == _RANGE:
        ranges = torch.empty(len(tasks), len(bits), slices, 2)
        ranges[..., 0], ranges[..., 1] = math.inf, -math.inf
    function = _kernel.library.plane_lookup
    row_stride = num_tiles * subarray
    bit_stride = num_rows * (width if mode == _SUMS else width // max(1, slices))

    def run(index: int) -> int:
        tile, start, stop = tasks[index]
        table, lists = _thread_scratch(table_floats, list_ints)
        real = last_tile_rows if tile == num_tiles - 1 else subarray
        offset = tile - tiles.start
        return function(magnitude.data_ptr() + tile * subarray, sign.data_ptr() + tile * subarray, row_stride,
                        columns[tile].data_ptr(), subarray, width, real, start, stop, r0, bits.start, len(bits),
                        out[offset].data_ptr() if out is not None else None, bit_stride, vectors,
                        table.data_ptr(), lists.data_ptr(), row_block, mode, slices, out_features,
                        adc[offset].data_ptr() if adc is not None else None, float(levels),
                        ranges[index].data_ptr() if ranges is not None else None)

    with torch.profiler.record_function(f"nipa::plane_lookup.{_MODE_NAMES[mode]}"):  # seen by profiles
        if workers == 1 or len(tasks) == 1:
            codes = [run(index) for index in range(len(tasks))]
        else:
            codes = list(native.thread_pool(workers).map(run, range(len(tasks))))
    if any(codes):
        raise RuntimeError(f"the lookup kernel refused its arguments (codes {set(codes)})")
    if ranges is None:
        return None
    # Fold the tasks of each tile: [t, z, K, 2].
    per_tile = ranges.view(len(tiles), pieces, len(bits), slices, 2)
    return torch.stack([per_tile[..., 0].amin(dim=1), per_tile[..., 1].amax(dim=1)], dim=-1)


def _row_span(magnitude: torch.Tensor, rows: slice) -> tuple[int, int]:
    """The batch rows [r0, r1) that `rows` selects of magnitude [n, T, S]."""
    n = magnitude.shape[0]
    return rows.start or 0, min(n, n if rows.stop is None else rows.stop)


def _row_count(magnitude: torch.Tensor, rows: slice) -> int:
    r0, r1 = _row_span(magnitude, rows)
    return r1 - r0


def vector_slice_columns(columns: torch.Tensor, slices: int) -> torch.Tensor:
    """Cells [T, S, K*out] (slice-major columns, c = k*out + o) in the order `read_range` and `adc_reads`
    take: outputs padded with zero cells to 16 * B, then [T, S, B, K, 16] flattened, so that each 16-float
    vector holds 16 outputs of one slice and the K slices of a block of outputs follow each other."""
    t, s, width = columns.shape
    out = width // slices
    padded = -(-out // 16) * 16
    grid = columns.reshape(t, s, slices, out)
    if padded != out:
        grid = torch.nn.functional.pad(grid, (0, padded - out))
    return grid.view(t, s, slices, padded // 16, 16).permute(0, 1, 3, 2, 4).reshape(t, s, -1).contiguous()


def partial_sums(magnitude: torch.Tensor, sign: torch.Tensor, columns: torch.Tensor, tiles: range, rows: slice,
                 bits: range, last_tile_rows: int, out: torch.Tensor) -> None:
    """out[t, z, r, c] = sum_s sign[r, t, s] bit_z(magnitude[r, t, s]) columns[t, s, c] for the tiles `tiles`
    (out's t counts from tiles.start), the batch rows `rows` (out's r from rows.start) and the bits `bits`.

    magnitude [n, T, S] uint8 and sign [n, T, S] int8; columns [T, S, C] float32 (all contiguous); out
    [len(tiles), len(bits), len(rows), C] float32 contiguous. The last tile (T - 1) holds cells in its
    first `last_tile_rows` rows."""
    expected = (len(tiles), len(bits), _row_count(magnitude, rows), columns.shape[-1])
    if tuple(out.shape) != expected:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {expected}")
    _run(_SUMS, magnitude, sign, columns, tiles, rows, bits, last_tile_rows, out=out)


def read_range(magnitude: torch.Tensor, sign: torch.Tensor, ordered: torch.Tensor, tiles: range, rows: slice,
               bits: range, last_tile_rows: int, slices: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the partial sums per (tile, bit, slice) over the rows and the slice's outputs, two
    [t, z, K] float32 tensors, without writing the sums; `ordered` = vector_slice_columns(columns, K)."""
    ranges = _run(_RANGE, magnitude, sign, ordered, tiles, rows, bits, last_tile_rows, slices, out_features)
    return ranges[..., 0], ranges[..., 1]


def adc_reads(magnitude: torch.Tensor, sign: torch.Tensor, ordered: torch.Tensor, tiles: range, rows: slice,
              bits: range, last_tile_rows: int, slices: int, out_features: int, lo: torch.Tensor,
              divisor: torch.Tensor, coefficient: torch.Tensor, levels: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The ADC's reads of the partial sums, weighted and summed over the slices, without writing the sums:
    V[t, z, r, o] = sum_k coefficient[t, z, k] * min(max(round((P[t, z, r, k, o] - lo) / divisor), 0), levels)
    with lo, divisor, coefficient [t, z, K], the slices added in increasing k: the terms of
    `crossbar._quantize_reads` before its constant. `ordered` = vector_slice_columns(columns, K).
    Returns [len(tiles), len(bits), len(rows), out_features], a view of `out` (a contiguous float32
    [len(tiles), len(bits), len(rows), ordered.shape[-1] // K] scratch, every element written; a new one
    when not given)."""
    num_rows = _row_count(magnitude, rows)
    shape = (len(tiles), len(bits), slices)
    adc = torch.stack([lo.expand(shape), divisor.expand(shape), coefficient.expand(shape)], dim=-1)
    adc = adc.float().contiguous()
    padded = ordered.shape[-1] // slices
    shape = (len(tiles), len(bits), num_rows, padded)
    if out is None:
        out = torch.empty(shape)  # the kernel writes every element
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected float32 {shape}")
    _run(_READ, magnitude, sign, ordered, tiles, rows, bits, last_tile_rows, slices, out_features, out=out,
         adc=adc, levels=float(levels))
    return out[..., :out_features]


def shift_add(reads: torch.Tensor, constant: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out[r, o] += (reads[t, z, r, o] + constant[t, z]) * scale[t, o], bits outer and tiles inner, each
    step rounded as torch's add_ and addcmul_ (a fused multiply-add): `reads` [T, Z, rows, padded] as
    `adc_reads` fills it, constant [T, Z], scale [T, out], out [rows, out] float32, all contiguous. One
    pass over the reads instead of one pass over out per (bit, tile); rows split over the worker threads
    (each output in one fixed order)."""
    if not available():
        raise RuntimeError("the lookup kernel is not available")
    tiles, bits, rows, padded = reads.shape
    out_features = out.shape[1]
    tensors = (reads, constant, scale, out)
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        raise ValueError("shift_add takes contiguous float32 tensors")
    if (tuple(constant.shape) != (tiles, bits) or tuple(scale.shape) != (tiles, out_features)
            or out.shape[0] != rows or out_features > padded):
        raise ValueError(f"shift_add: shapes {[tuple(t.shape) for t in tensors]} do not match")
    workers = min(native.workers(), max(1, rows // 64))
    bounds = [rows * k // workers for k in range(workers + 1)]
    function = _kernel.library.shift_add

    def run(k: int) -> None:
        function(reads.data_ptr(), constant.data_ptr(), scale.data_ptr(), out.data_ptr(), tiles, bits, rows,
                 padded, out_features, bounds[k], bounds[k + 1])

    with torch.profiler.record_function("nipa::plane_lookup.shift_add"):
        if workers == 1:
            run(0)
        else:
            list(native.thread_pool(workers).map(run, range(workers)))
