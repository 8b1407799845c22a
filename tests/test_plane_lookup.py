"""The CPU lookup kernel (nipa/simulator/plane_lookup.c): partial sums, ranges and fused ADC reads against
float64 references, and the crossbar layers that use it against the batched products (NIPA_LOOKUP=0)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import warnings

import pytest
import torch
from torch import nn

from nipa.hardware.config import HWConfig
from nipa.simulator import crossbar, plane_lookup
from nipa.simulator.crossbar import convert, crossbar_cores

pytestmark = pytest.mark.skipif(not plane_lookup.available(), reason="no C compiler for the lookup kernel")


def _inputs(n: int, tiles: int, rows: int, signed: bool, seed: int, bits: int = 7):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, tiles, rows, generator=generator)
    if not signed:
        values = values.relu()
    top = 2**bits - 1
    q = torch.clamp(torch.round(values / values.abs().max() * top), -top, top)
    return q.abs().to(torch.uint8).contiguous(), torch.sign(q).to(torch.int8).contiguous(), q


def _reference_sums(q: torch.Tensor, columns: torch.Tensor, bits: range, last_tile_rows: int) -> torch.Tensor:
    """P[t, z, r, c] in float64 from the signed integer inputs q [n, T, S]."""
    cells = columns.double().clone()
    cells[-1, last_tile_rows:] = 0  # rows past the short last tile hold no cells
    magnitude, sign = q.abs().long(), torch.sign(q).double()
    planes = torch.stack([((magnitude >> z) & 1).double() * sign for z in bits], dim=0)  # [z, n, T, S]
    return torch.einsum("znts,tsc->tznc", planes, cells)


def _dyadic(shape, seed: int) -> torch.Tensor:
    """Cells on a 2^-10 grid: every partial sum is exact in float32, in any order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.round((torch.rand(shape, generator=generator) - 0.3) * 2**10) / 2**10


@pytest.mark.parametrize(("rows", "signed"), [(128, False), (128, True), (9, False), (30, True), (256, False)])
def test_partial_sums_equal_float64(rows: int, signed: bool) -> None:
    """Any row count (groups of 4 with a short last group), signed inputs, a short last tile, a range of
    tiles, rows and bits of a larger input: exact on dyadic cells."""
    n, tiles, out = 300, 3, 40
    magnitude, sign, q = _inputs(n, tiles, rows, signed, seed=rows)
    columns = _dyadic((tiles, rows, 2 * out), seed=1)
    last = max(1, rows - 5)
    reference = _reference_sums(q, columns, range(7), last)
    out_all = torch.empty(tiles, 7, n, 2 * out)
    plane_lookup.partial_sums(magnitude, sign, columns, range(tiles), slice(0, n), range(7), last, out_all)
    assert torch.equal(out_all.double(), reference)
    part = torch.empty(2, 3, 120, 2 * out)
    plane_lookup.partial_sums(magnitude, sign, columns, range(1, 3), slice(50, 170), range(2, 5), last, part)
    assert torch.equal(part.double(), reference[1:3, 2:5, 50:170])


def test_partial_sums_of_float_cells_within_float32_rounding() -> None:
    magnitude, sign, q = _inputs(200, 2, 128, True, seed=3)
    columns = torch.rand(2, 128, 96)
    out = torch.empty(2, 7, 200, 96)
    plane_lookup.partial_sums(magnitude, sign, columns, range(2), slice(0, 200), range(7), 128, out)
    reference = _reference_sums(q, columns, range(7), 128)
    assert ((out.double() - reference).abs().max() / reference.abs().max()).item() < 1e-6


@pytest.mark.parametrize(("out", "slices"), [(40, 3), (16, 8), (7, 1), (100, 4)])
def test_range_and_reads_equal_the_adc_chain(out: int, slices: int) -> None:
    """read_range: the exact min and max per (tile, bit, slice), padding outputs left out; adc_reads: the
    ADC chain's indices weighted and summed over the slices in increasing k, bit-identical."""
    n, tiles, rows = 260, 3, 64
    magnitude, sign, q = _inputs(n, tiles, rows, True, seed=out)
    columns = _dyadic((tiles, rows, slices * out), seed=out + 1)
    reference = _reference_sums(q, columns, range(7), rows - 3).float()  # exact
    partial = reference.view(tiles, 7, n, slices, out)
    ordered = plane_lookup.vector_slice_columns(columns, slices)
    lo, hi = plane_lookup.read_range(magnitude, sign, ordered, range(tiles), slice(0, n), range(7), rows - 3,
                                     slices, out)
    assert torch.equal(lo, partial.amin(dim=(2, 4))) and torch.equal(hi, partial.amax(dim=(2, 4)))
    levels = 2**4
    # A dynamic range over all tiles (a tile's reads may then fall outside [lo, hi]: the clamp) and steps
    # that put many reads exactly halfway between two levels (round half to even).
    lo_all, hi_all = lo.amin(dim=0, keepdim=True).expand_as(lo), hi.amax(dim=0, keepdim=True).expand_as(hi)
    lo_all = lo_all * 0.5
    step = (hi_all - lo_all) / levels
    divisor = torch.where(step > 0, step, torch.ones_like(step))
    coefficient = torch.rand(tiles, 7, slices) * step
    reads = plane_lookup.adc_reads(magnitude, sign, ordered, range(tiles), slice(0, n), range(7), rows - 3,
                                   slices, out, lo_all, divisor, coefficient, levels)
    index = torch.minimum(torch.round((partial - lo_all[:, :, None, :, None]) / divisor[:, :, None, :, None])
                          .clamp_min(0), torch.tensor(float(levels)))
    terms = index * coefficient[:, :, None, :, None]
    expected = terms[:, :, :, 0]
    for k in range(1, slices):
        expected = expected + terms[:, :, :, k]
    assert torch.equal(reads, expected)
    assert (index == 0).any() and (index == levels).any()  # the clamp was exercised at both ends
    # Into a caller's scratch (filled with garbage first: every element is written), and a wrong one refused.
    padded = ordered.shape[-1] // slices
    scratch = torch.full((tiles, 7, n, padded), float("nan"))
    into = plane_lookup.adc_reads(magnitude, sign, ordered, range(tiles), slice(0, n), range(7), rows - 3,
                                  slices, out, lo_all, divisor, coefficient, levels, out=scratch)
    assert torch.equal(into, expected) and into.data_ptr() == scratch.data_ptr()
    with pytest.raises(ValueError, match="expected float32"):
        plane_lookup.adc_reads(magnitude, sign, ordered, range(tiles), slice(0, n), range(7), rows - 3,
                               slices, out, lo_all, divisor, coefficient, levels, out=scratch[:, :, 1:])


def test_the_thread_count_changes_no_bit() -> None:
    magnitude, sign, _ = _inputs(700, 4, 128, False, seed=5)
    columns = torch.rand(4, 128, 8 * 24)
    ordered = plane_lookup.vector_slice_columns(columns, 8)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            lo, hi = plane_lookup.read_range(magnitude, sign, ordered, range(4), slice(0, 700), range(7), 128, 8, 24)
            step = (hi - lo) / 32
            reads = plane_lookup.adc_reads(magnitude, sign, ordered, range(4), slice(0, 700), range(7), 128, 8, 24,
                                           lo, torch.where(step > 0, step, 1.0), step, 32)
            results.append((lo, hi, reads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0], strict=True))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 24, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24 * 7 * 7, 10))


@pytest.mark.parametrize("adc_mode", ["dynamic", "dynamic_tile", "calibrated", "full"])
@pytest.mark.parametrize("vari", [0.0, 0.1])
def test_crossbar_layers_with_the_kernel_equal_the_batched_products(adc_mode: str, vari: float,
                                                                     monkeypatch) -> None:
    """Each layer fed the same input: the lookup path and the batched products agree to float rounding
    (they sum the slices in another order), for every ADC mode, with and without device error. Device
    errors are snapped to a 2^-10 grid (as bench/simulator.py's exactness check does), so that the partial
    sums are exact in both summation orders and no read can land on the other side of an ADC level."""
    hw = HWConfig(wl_weight=8, wl_input=8, subArray=64, ADCprecision=5, cellBit=2, vari=vari, adc_mode=adc_mode)
    x = torch.randn(16, 3, 16, 16)
    model = convert(_model(), hw, seed=3).eval()
    for core in crossbar_cores(model):
        core.conductance = torch.round(core.conductance * 2**10) / 2**10
    if adc_mode == "calibrated":
        crossbar.calibrate_adc(model, [x])
    inputs: dict[str, tuple] = {}  # (rows, scale_in): a convolution's core takes integer levels and their scale
    hooks = [core.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m.name, a))
             for core in crossbar_cores(model)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for core in crossbar_cores(model):
        with torch.no_grad():
            monkeypatch.setenv("NIPA_LOOKUP", "1")
            crossbar._PRODUCTS_USED.clear()
            fast = core(*inputs[core.name])
            used = crossbar.product_mode()
            monkeypatch.setenv("NIPA_LOOKUP", "0")
            slow = core(*inputs[core.name])
        if inputs[core.name][0].shape[0] * 7 >= 64:
            assert used == "lookup", core.name
        assert ((fast - slow).abs().max() / slow.abs().max()).item() < 1e-5, core.name


def test_the_memory_budget_changes_no_bit() -> None:
    """The reads run over blocks of rows sized by the budget; the range spans them all."""
    hw = HWConfig(wl_weight=8, wl_input=8, subArray=64, ADCprecision=4, cellBit=1, vari=0.1)
    x = torch.randn(8, 3, 16, 16)
    outputs = [convert(_model(), hw, seed=1, memory_mb=budget).eval()(x) for budget in (0.05, 1, 256)]
    assert all(torch.equal(other, outputs[0]) for other in outputs[1:])


def test_in_place_changes_of_the_cells_are_seen() -> None:
    model = convert(nn.Linear(64, 32), HWConfig(subArray=32, ADCprecision=6, vari=0.1)).eval()
    x = torch.randn(32, 64)
    first = model(x)
    model.core.conductance.mul_(2)
    assert not torch.equal(model(x), first)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(plane_lookup._kernel, "library", None)
    monkeypatch.setattr(plane_lookup._kernel, "failure", None)

    def broken() -> None:
        raise RuntimeError("cc failed on plane_lookup.c: test")

    monkeypatch.setattr(plane_lookup, "_build", broken)
    with pytest.warns(UserWarning, match="lookup kernel is unavailable"):
        assert not plane_lookup.available()
    model = convert(nn.Linear(64, 8), HWConfig(subArray=32, ADCprecision=5, vari=0.1)).eval()
    crossbar._PRODUCTS_USED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per layer
        model(torch.randn(64, 64))
    assert crossbar.product_mode() == "matmul"


def test_the_kernel_is_built_into_the_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NIPA_CACHE_DIR", str(tmp_path))
    library = plane_lookup._build()
    built = list((tmp_path / "kernels").glob("plane_lookup-*.so"))
    assert len(built) == 1 and library.plane_lookup is not None


def test_the_portable_build_equals_the_native_one(tmp_path, monkeypatch) -> None:
    """The kernel built without AVX-512 (the generic vector code, its rounding and clamps, and the
    portable read lists other CPUs run) gives the native build's sums, ranges and reads bit for bit."""
    monkeypatch.setenv("NIPA_CACHE_DIR", str(tmp_path))
    try:
        portable = plane_lookup._build(extra_flags=("-mno-avx512f",))
    except RuntimeError as exc:  # a compiler without that flag (not x86)
        pytest.skip(str(exc))
    magnitude, sign, _ = _inputs(300, 3, 70, True, seed=11)
    columns = torch.rand(3, 70, 3 * 40) - 0.4
    ordered = plane_lookup.vector_slice_columns(columns, 3)

    def everything() -> list[torch.Tensor]:
        sums = torch.empty(3, 7, 300, 120)
        plane_lookup.partial_sums(magnitude, sign, columns, range(3), slice(0, 300), range(7), 66, sums)
        lo, hi = plane_lookup.read_range(magnitude, sign, ordered, range(3), slice(0, 300), range(7), 66, 3, 40)
        step = (hi - lo) / 16
        reads = plane_lookup.adc_reads(magnitude, sign, ordered, range(3), slice(0, 300), range(7), 66, 3, 40,
                                       lo * 0.7, torch.where(step > 0, step, 1.0), step, 16)
        return [sums, lo, hi, reads]

    native = everything()
    monkeypatch.setattr(plane_lookup._kernel, "library", portable)
    for a, b in zip(everything(), native, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_the_kernel() -> None:
    """A child forked after the worker threads started (a data-loading worker, say) gets its own pool."""
    magnitude, sign, _ = _inputs(600, 4, 128, False, seed=2)
    columns = torch.rand(4, 128, 64)
    out = torch.empty(4, 7, 600, 64)
    plane_lookup.partial_sums(magnitude, sign, columns, range(4), slice(0, 600), range(7), 128, out)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_sums, args=(magnitude, sign, columns, queue))
    child.start()
    digest = queue.get(timeout=60)
    child.join(timeout=60)
    assert digest == hashlib.sha256(out.numpy().tobytes()).hexdigest()


def _child_sums(magnitude, sign, columns, queue) -> None:
    out = torch.empty(4, 7, 600, 64)
    plane_lookup.partial_sums(magnitude, sign, columns, range(4), slice(0, 600), range(7), 128, out)
    queue.put(hashlib.sha256(out.numpy().tobytes()).hexdigest())


@pytest.mark.parametrize("wl_input", [4, 9])
def test_input_widths_up_to_eight_magnitude_bits(wl_input: int, monkeypatch) -> None:
    """3 and 8 magnitude bits (the kernel tests bit 7 too): the lookup path agrees with the batched one."""
    hw = HWConfig(wl_weight=6, wl_input=wl_input, subArray=64, ADCprecision=5, cellBit=1, vari=0.1)
    layer = convert(nn.Linear(150, 40), hw, seed=2).eval()
    layer.core.conductance = torch.round(layer.core.conductance * 2**10) / 2**10
    x = torch.randn(64, 150)
    monkeypatch.setenv("NIPA_LOOKUP", "1")
    crossbar._PRODUCTS_USED.clear()
    fast = layer(x)
    assert crossbar.product_mode() == "lookup"
    monkeypatch.setenv("NIPA_LOOKUP", "0")
    slow = layer(x)
    assert ((fast - slow).abs().max() / slow.abs().max()).item() < 1e-5


@pytest.mark.parametrize(("tiles", "bits", "rows", "out"), [(3, 7, 300, 40), (1, 2, 5, 16), (2, 3, 1000, 600)])
def test_shift_add_equals_the_sequential_torch_loop(tiles: int, bits: int, rows: int, out: int) -> None:
    """One pass over the reads gives what T * Z add_/addcmul_ passes gave, bit for bit, for any thread
    count (the padding columns of the reads are never read)."""
    padded = -(-out // 16) * 16
    reads = torch.randn(tiles, bits, rows, padded)
    reads[..., out:] = float("nan")
    constant, scale = torch.randn(tiles, bits), torch.randn(tiles, out)
    expected = torch.zeros(rows, out)
    shifted = reads[..., :out] + constant[:, :, None, None]
    for z in range(bits):
        for t in range(tiles):
            expected.addcmul_(shifted[t, z], scale[t])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            result = torch.zeros(rows, out)
            plane_lookup.shift_add(reads, constant, scale, result)
            assert torch.equal(result, expected), count
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="do not match"):
        plane_lookup.shift_add(reads, constant[:, :1].contiguous(), scale, result)
