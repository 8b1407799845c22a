"""Input rows that a layer reads again and again, and their exact ADC error (the "repeated" form).

A convolution over images with a constant background (MNIST's), or over zero patches after a ReLU,
reads the same few input rows most of the time: in SmallCNN's first layer on MNIST, 5 rows are 68% of
all rows. A deterministic ADC rounds such a row the same way every time it is read, so its error is
one fixed offset, not noise; noise of the same power in their place costs up to 7 points of accuracy
where the simulator loses less than one (docs/estimate_analysis.md, section 10).

Rows are found by an exact integer hash: two random integer weight vectors h = levels . R (float64;
integer levels times integers below 2^20 summed over the fan-in stay below 2^53, so every sum is exact
in any order), the same in the calibration (on the crossbar's rows) and in the forward (one
float64 convolution with two output channels). A row counts as repeated when it is at least
`MIN_SHARE` of the calibration's rows (at most `MAX_ROWS` per layer) and *stable*: with a dynamic ADC
range, which is one batch's, a row's error changes with the batch whenever the range does (a later
layer's ranges follow the images, the first layer's the pixel range, which every batch spans); a row
whose error differs between the calibration batches by more than `MAX_BETWEEN_SHARE` of its power is
left to the noise, as every other row.

On a CPU a convolution's hash, match and error take one pass of a C kernel (`repeated_rows.c`, built by
`nipa.native`; the same values as the PyTorch operations, which run where it is not available or
NIPA_REPEATED_KERNEL=0).
"""

from __future__ import annotations

import ctypes
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nipa import native

MIN_SHARE = 0.01  # of a layer's calibration rows
MAX_ROWS = 16  # per layer
CANDIDATE_SHARE = MIN_SHARE / 2  # of one batch's rows: tracked per batch
# A repeated row's between-batch error power, as a share of its error power (mean^2 + between): above
# it the row's error is the batch's range's, not the row's. SmallCNN on MNIST: 0 in conv1, ~0.5 in
# conv2 (docs/estimate_analysis.md, section 10).
MAX_BETWEEN_SHARE = 0.1
_HASH_RANGE = 2**20


def hash_weights(name: str, fan_in: int, max_level: int | None = None) -> torch.Tensor:
    """[2, fan_in] random integers, fixed per layer name: below 2^20 in float64, or in float32 where every
    hash of rows of levels up to `max_level` stays below 2^24 (exact in float32 too, and a float32
    convolution is twice as fast) with weights up to at least 2^12."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"repeated:{name}".encode()))
    if max_level is not None:
        limit = 2**24 // max(1, fan_in * max_level)
        if limit >= 2**12:
            return torch.randint(0, min(limit, _HASH_RANGE), (2, fan_in), generator=generator).float()
    return torch.randint(0, _HASH_RANGE, (2, fan_in), generator=generator).double()


def row_hashes(levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[n, 2] hashes of integer input rows [n, fan_in] (in the weights' dtype, exact: see hash_weights)."""
    return levels.to(weights.dtype) @ weights.to(levels.device).t()


_SLOT_PRIMES = (61, 127, 251, 509, 1021, 2039, 4093)


def match(hashes: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Index into `known` [M, 2] of each hash [2, ...] (its two halves first), -1 where none matches.
    The first half modulo a prime at which the known rows fall in distinct slots names one candidate
    per hash (a fixed number of passes, whatever M: faster above about 6 rows), and both halves are
    compared with it; for fewer rows, or where no such prime exists, one comparison per known row."""
    first, second = hashes[0], hashes[1]
    residues = torch.remainder(known[:, 0], 1.0)  # integer-valued hashes: all 0
    for prime in _SLOT_PRIMES if known.shape[0] > 6 else ():
        slots = torch.remainder(known[:, 0], prime).long()
        if prime >= 4 * known.shape[0] and bool(residues.eq(0).all()) and slots.unique().numel() == known.shape[0]:
            table = torch.full((prime,), known.shape[0], dtype=torch.long, device=known.device)
            table[slots] = torch.arange(known.shape[0], device=known.device)
            padded = torch.cat([known, known.new_full((1, 2), -1.0)])  # slot without a row: no hash is -1
            candidate = table[torch.remainder(first, prime).long()]
            found = (padded[candidate, 0] == first) & (padded[candidate, 1] == second)
            return torch.where(found, candidate, torch.full_like(candidate, -1))
    index = torch.full(first.shape, -1, dtype=torch.long, device=first.device)
    for i, value in enumerate(known[:, 0].tolist()):
        index.masked_fill_(first == value, i)
    missed = (index >= 0) & (second != known[index.clamp(min=0), 1])
    return index.masked_fill_(missed, -1)


@dataclass
class RowTally:
    """The calibration's record of one layer's candidate rows at one ADC resolution: per hash, the row
    (integer levels), its count and per batch its count and exact error, and the error power of the
    other rows."""

    rows: dict[tuple[float, float], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[float, float], list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    total_rows: int = 0
    rest_sum: torch.Tensor | float = 0.0  # sum over other rows of sum_t scale_w^2 E_t^2, [out]
    rest_count: float = 0.0
    batches: int = 0

    def add_batch(self, rows: int, candidates: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                  errors: torch.Tensor, powers: torch.Tensor, others_mean: torch.Tensor) -> None:
        """One batch of `rows` rows: its candidate rows [m, fan_in] with hashes [m, 2], counts [m],
        exact errors [m, out] (sum_t scale_w E_t) and powers [m, out] (sum_t scale_w^2 E_t^2); the mean
        power of its other rows [out] (a sample's)."""
        self.total_rows += rows
        self.batches += 1
        others = rows - int(counts.sum())
        self.rest_sum = self.rest_sum + others_mean.double() * others
        self.rest_count += others
        for i, key in enumerate(map(tuple, keys.tolist())):
            self.rows.setdefault(key, candidates[i])
            self.counts.setdefault(key, []).append((int(counts[i]), errors[i].double(), powers[i].double()))

    def select(self, fixed_range: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [M, fan_in], hashes [M, 2], exact errors [M, out], rest variance [out]): the repeated,
        stable rows (see the module docstring) and the error power of every other row. fixed_range: the
        ADC's range does not depend on the batch, so a row's error is the same in every batch."""
        ranked = sorted(self.counts, key=lambda k: -sum(c for c, _, _ in self.counts[k]))
        chosen, errors = [], []
        rest_sum, rest_count = self.rest_sum, self.rest_count
        for key in ranked:
            seen = self.counts[key]
            count = sum(c for c, _, _ in seen)
            weights = torch.tensor([c for c, _, _ in seen], dtype=torch.float64).view(-1, 1)
            per_batch = torch.stack([e for _, e, _ in seen])
            mean = (weights * per_batch).sum(0) / count
            between = (weights * (per_batch - mean).square()).sum(0) / count
            power = mean.square().mean() + between.mean()
            stable = fixed_range or (len(seen) >= 2 and float(between.mean()) <= MAX_BETWEEN_SHARE * float(power))
            if len(chosen) < MAX_ROWS and count >= MIN_SHARE * self.total_rows and stable:
                chosen.append(key)
                errors.append(mean)
            else:  # left to the noise: its occurrences join the other rows' power
                rest_sum = rest_sum + sum(c * p for c, _, p in seen)
                rest_count += count
        rest = rest_sum / max(rest_count, 1.0)  # [out] (zero when every row is a repeated one)
        if not chosen:
            return (torch.zeros(0, 0), torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 0),
                    torch.as_tensor(rest, dtype=torch.float64))
        rows = torch.stack([self.rows[k] for k in chosen])
        hashes = torch.tensor(chosen, dtype=torch.float64)
        return rows, hashes, torch.stack(errors).float(), torch.as_tensor(rest, dtype=torch.float64)


def conv_hashes(levels: torch.Tensor, weights: torch.Tensor, kernel_size: tuple[int, int],
                stride, padding: tuple[int, int, int, int], dilation) -> torch.Tensor:
    """[2, n, OH, OW] hashes of a convolution's input patches (zero padded as the crossbar's rows), from
    its integer input levels [n, C, H, W]."""
    x = levels.to(weights.dtype)
    if any(padding):
        x = F.pad(x, padding)
    kernel = weights.to(x.device).view(2, x.shape[1], *kernel_size)
    return F.conv2d(x, kernel, None, stride, 0, dilation).transpose(0, 1)


_SOURCE = Path(__file__).with_name("repeated_rows.c")


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    library = native.build(_SOURCE, extra_flags)
    pointer, long = ctypes.c_void_p, ctypes.c_long
    library.repeated_conv_error.restype = ctypes.c_int
    library.repeated_conv_error.argtypes = ([pointer, ctypes.c_float] + [long] * 13 + [pointer, pointer, long]
                                            + [pointer] * 4 + [long] * 3 + [pointer] * 3)
    return library


_kernel = native.Kernel(lambda: _build(), "NIPA_REPEATED_KERNEL",
                        "the repeated form's C kernel is unavailable ({reason}); its convolutions run as "
                        "PyTorch operations (slower)")


def kernel_available() -> bool:
    """True when the C kernel is enabled and compiled (compiling it on the first call)."""
    return _kernel.available()


_KERNEL_ROWS = 31  # known rows the kernel's table holds (MAX_ROWS is fewer)


def kernel_takes(rows: int, *tensors: torch.Tensor) -> bool:
    """Whether `conv_error` runs on these tensors and `rows` known rows: contiguous float32 on the CPU,
    the kernel available."""
    return (0 < rows <= _KERNEL_ROWS and kernel_available()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors))


def conv_error(y: torch.Tensor, x: torch.Tensor, scale_in: torch.Tensor, weights: torch.Tensor,
               known: torch.Tensor, errors: torch.Tensor, std: torch.Tensor, noise: torch.Tensor,
               kernel_size: tuple[int, int], stride, padding: tuple[int, int, int, int], dilation) -> torch.Tensor:
    """y [n, out, OH, OW] + the repeated form's error, in place, by the C kernel (see repeated_rows.c and
    `kernel_takes`): from the quantized input x [n, C, H, W] (levels * scale_in), the hash weights
    [2, fan_in], the known hashes [M, 2], the scaled exact errors [M, out], the scaled deviation [out] and
    standard normals shaped as y. The same values as `conv_hashes`, `match` and the PyTorch path."""
    if not kernel_takes(known.shape[0], y, x, errors, std, noise):
        raise ValueError("the repeated form's kernel takes contiguous float32 CPU tensors")
    n, channels, height, width = x.shape
    out_channels, out_h, out_w = y.shape[1:]
    if weights.shape != (2, channels * kernel_size[0] * kernel_size[1]) or errors.shape != (known.shape[0],
                                                                                          out_channels):
        raise ValueError(f"repeated rows: hash weights {tuple(weights.shape)} or errors {tuple(errors.shape)} "
                         f"do not fit a {kernel_size} kernel over {channels} channels into {out_channels}")
    hash_weights = weights.to(torch.int64).contiguous()
    known = known.to(torch.int64).contiguous()
    scale = float(scale_in)
    workers = min(native.workers(), n)
    bounds = [n * k // workers for k in range(workers + 1)]
    function = _kernel.library.repeated_conv_error

    def run(k: int) -> int:
        levels = torch.empty(channels * height * width, dtype=torch.int32)
        index = torch.empty(out_h * out_w, dtype=torch.int32)
        hashes = torch.empty(2 * out_w, dtype=torch.int64)
        return function(x.data_ptr(), scale, channels, height, width, *kernel_size, *stride, padding[2],
                        padding[0], *dilation, out_h, out_w, hash_weights.data_ptr(), known.data_ptr(),
                        known.shape[0], errors.data_ptr(), std.data_ptr(), noise.data_ptr(), y.data_ptr(),
                        out_channels, bounds[k], bounds[k + 1], levels.data_ptr(), index.data_ptr(),
                        hashes.data_ptr())

    with torch.profiler.record_function("nipa::repeated_conv_error"):
        codes = [run(0)] if workers == 1 else list(native.thread_pool(workers).map(run, range(workers)))
    if any(codes):
        raise RuntimeError(f"the repeated form's kernel refused its arguments (codes {set(codes)})")
    return y
