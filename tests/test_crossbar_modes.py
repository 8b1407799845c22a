"""The simulator's modes and options: the ADC range across tiles, results independent of the memory
budget, per-read device error, exact bfloat16 products, the compiled ADC chain and `--compat`."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from nipa.hardware.compat import SWITCHES, Compat, CompatError
from nipa.hardware.config import HWConfig
from nipa.simulator.crossbar import ADC_CHAIN, calibrate_adc, convert, crossbar_cores, final_classifier


def small_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # fan-in 27
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False),  # fan-in 72: 3 tiles of 32 rows
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),  # fan-in 96
        nn.ReLU(),
        nn.Linear(12, 5),
    )


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---- the ADC range across tiles -------------------------------------------------------------------


def test_dynamic_range_spans_tiles_and_dynamic_tile_does_not() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(300, 16)  # 3 tiles of 128 rows, the last one short
    x = torch.randn(64, 300)
    single = nn.Linear(100, 16)  # one tile
    outputs = {}
    for mode in ("dynamic", "dynamic_tile"):
        hw = HWConfig(subArray=128, ADCprecision=4, adc_mode=mode)
        outputs[mode] = run(convert(layer, hw), x), run(convert(single, hw), x[:, :100])
    assert not torch.allclose(outputs["dynamic"][0], outputs["dynamic_tile"][0], rtol=1e-3, atol=1e-4)
    assert torch.equal(outputs["dynamic"][1], outputs["dynamic_tile"][1])
    # The shared range is coarser than each tile's own: the error against the fake-quantized layer grows.
    ideal = run(convert(layer, HWConfig(subArray=128, ADCprecision=24)), x)
    errors = {mode: (outputs[mode][0] - ideal).pow(2).mean() for mode in outputs}
    assert errors["dynamic"] > errors["dynamic_tile"]


# ---- results do not depend on the memory budget --------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "errors", "per_read"),
    [("dynamic", {}, False), ("dynamic_tile", {}, False), ("calibrated", {}, False), ("full", {}, False),
     ("dynamic", {"vari": 0.1, "SAF_prop": 0.01}, False), ("dynamic_tile", {"vari": 0.1}, False),
     ("full", {"vari": 0.2}, True), ("dynamic", {"vari": 0.2, "SAF_prop": 0.01}, True)],
)
def test_memory_budget_changes_no_number(mode: str, errors: dict, per_read: bool) -> None:
    """Chunks of tiles, bits and rows (down to a budget of a few hundred floats, every layer split and
    the dynamic ranges found in a first pass) change no draw and no range. With integer cells (no device
    error) every partial sum is exact, so the outputs are bit-identical; with device error the float32
    products of other shapes may sum in another order (the BLAS picks kernels by shape), so outputs agree
    to float rounding up to a rare ADC level flip."""
    net = small_net(5)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=4, cellBit=1, adc_mode=mode, **errors)
    x = torch.randn(6, 3, 8, 8)
    results = []
    for memory_mb in (1024, 0.05, 0.002):
        model = convert(net, hw, seed=2, chip=1, per_read=per_read, memory_mb=memory_mb).eval()
        if mode == "calibrated":
            calibrate_adc(model, [x[:3], x[3:]])
        results.append(run(model, x))
    chunks = crossbar_cores(convert(net, hw, memory_mb=0.002))[1]._chunking(6 * 16)
    assert chunks[0] < 3 or chunks[2] < 6 * 16  # tiles or rows really split
    for other in results[1:]:
        if errors:
            far = (other - results[0]).abs() > 1e-4 * results[0].abs().max()
            assert far.float().mean() < 0.05
            assert torch.allclose(other, results[0], rtol=0, atol=0.05 * results[0].abs().max())
        else:
            assert torch.equal(other, results[0])


# ---- per-read device error -----------------------------------------------------------------------


def _bit_error_power(per_read: bool, draws: int) -> float:
    """Output error power of one weight read with an input whose 7 magnitude bits are all 1."""
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    hw = HWConfig(wl_weight=2, wl_input=8, subArray=8, ADCprecision=24, cellBit=1, vari=0.1,
                  adc_mode="full")
    x = torch.full((1, 1), 127.0)
    errors = []
    for chip in range(draws):
        model = convert(layer, hw, seed=0, chip=chip, per_read=per_read)
        errors.append(run(model, x).item() - 127.0)
    return float(torch.tensor(errors).pow(2).mean())


def test_per_read_error_is_independent_over_input_bits() -> None:
    """A chip's cell error is one draw for every bit: its output error is 127 x the cell error
    (power 127^2 sigma^2 = 16129 sigma^2). Fresh errors per read add as independent draws over the 7 bits:
    sum_z 4^z sigma^2 = 5461 sigma^2. The ratio is 2.95; a per-read draw shared by the bits would give 1."""
    per_chip = _bit_error_power(per_read=False, draws=400)
    per_read = _bit_error_power(per_read=True, draws=400)
    sigma2 = 0.1**2
    assert per_chip == pytest.approx(16129 * sigma2, rel=0.25)
    assert per_read == pytest.approx(5461 * sigma2, rel=0.25)


def test_per_read_redraws_every_forward_but_keeps_faults() -> None:
    layer = nn.Linear(16, 4)
    x = torch.randn(8, 16)
    hw = HWConfig(subArray=16, ADCprecision=8, vari=0.1)
    model = convert(layer, hw, seed=0, per_read=True)
    first, second = run(model, x), run(model, x)
    assert not torch.equal(first, second)
    # Re-programming the same chip replays the same reads.
    model.core.program(0, 0)
    assert torch.equal(run(model, x), first)
    # Stuck-at faults are permanent: with faults only, every read sees the same cells.
    faults = convert(layer, HWConfig(subArray=16, ADCprecision=8, SAF_prop=0.05), seed=0, per_read=True)
    assert torch.equal(run(faults, x), run(faults, x))
    assert not torch.equal(run(faults, x), run(convert(layer, HWConfig(subArray=16, ADCprecision=8)), x))


# ---- low-precision products ----------------------------------------------------------------------


def _force_fastest(monkeypatch, fastest: torch.dtype) -> None:
    """Pretend only `fastest` (besides float32) was timed faster than float32 on this CPU, with the
    batched products (the lookup kernel off)."""
    import nipa.simulator.crossbar as crossbar

    monkeypatch.setenv("NIPA_LOOKUP", "0")

    seconds = {d: (0.5 if d == fastest else math.inf) for d in (torch.bfloat16, torch.int8)}
    monkeypatch.setitem(crossbar._PRODUCT_SECONDS, "cpu", {torch.float32: 1.0, **seconds})


@pytest.mark.parametrize(("rows", "cell_bits"), [(128, 1), (256, 1), (64, 2), (32, 3), (512, 1), (128, 3)])
def test_low_precision_products_equal_float32(rows: int, cell_bits: int, monkeypatch) -> None:
    """Integer cells: bfloat16 products (partial sums within 2^8) and int8 ones (int32 sums, any rows)
    are exact, bit-identical to float32; each is taken only where it is exact. The layer's fan-in leaves
    a short last tile (7 rows), multiplied over its real rows only."""
    torch.manual_seed(rows + cell_bits)
    layer = nn.Linear(rows * 2 + 7, 24)
    x = torch.randn(32, rows * 2 + 7)
    hw = HWConfig(wl_weight=8, subArray=rows, ADCprecision=5, cellBit=cell_bits)
    model = convert(layer, hw)
    assert model.core.last_tile_rows == 7
    _force_fastest(monkeypatch, torch.float32)
    assert model.core._product_dtype() == torch.float32
    reference = run(model, x)
    bf16_exact = rows * (2**cell_bits - 1) <= 256
    for fastest in (torch.bfloat16, torch.int8):
        _force_fastest(monkeypatch, fastest)
        expected = fastest if fastest == torch.int8 or bf16_exact else torch.float32
        assert model.core._product_dtype() == expected
        assert torch.equal(run(model, x), reference)
    monkeypatch.setenv("NIPA_INT8", "0")
    monkeypatch.setenv("NIPA_BF16", "0")
    assert model.core._product_dtype() == torch.float32
    # Device error: the cells are no longer integers, so the products stay in float32.
    noisy = convert(layer, HWConfig(wl_weight=8, subArray=rows, ADCprecision=5, cellBit=cell_bits, vari=0.1))
    monkeypatch.delenv("NIPA_INT8")
    monkeypatch.delenv("NIPA_BF16")
    assert noisy.core._product_dtype() == torch.float32


@pytest.mark.parametrize("memory_mb", [1024, 0.01])
def test_split_float_cells_equal_naive(memory_mb: float, monkeypatch) -> None:
    """NIPA_SPLIT=1: float cells as three int8 parts. Cells on a 2^-10 grid are held exactly, so every
    layer equals the naive loop to float rounding; raw cells are held to 2^-21 of a column's largest."""
    import nipa.simulator.crossbar as crossbar
    from nipa.simulator.reference import compare_layerwise, naive_convert

    monkeypatch.setenv("NIPA_SPLIT", "1")
    monkeypatch.setitem(crossbar._RAW_PRODUCT_SECONDS, "cpu", {torch.float32: 1.0, torch.bfloat16: 0.5,
                                                                torch.int8: 0.1})
    net = small_net(9)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=5, cellBit=2, vari=0.1, SAF_prop=0.01)
    x = torch.randn(6, 3, 8, 8)
    fast = convert(net, hw, seed=4, memory_mb=memory_mb).eval()
    naive = naive_convert(net, hw, seed=4).eval()
    cores = crossbar_cores(fast)
    assert all(core._splits_cells() for core in cores)
    for core in cores:
        columns, scales = core._split_columns()
        width = columns.shape[2] // 3
        held = sum(columns[..., i * width:(i + 1) * width].double() * scales[..., i * width:(i + 1) * width]
                   for i in range(3))
        largest = core.conductance.abs().amax(dim=1, keepdim=True).double()
        assert ((held - core.conductance.double()).abs() / largest).max() <= 2**-21
    for model in (fast, naive):
        for core in crossbar_cores(model):
            core.conductance = torch.round(core.conductance * 2**10) / 2**10
    assert max(compare_layerwise(fast, naive, x).values()) < 1e-5


def test_wide_reads_are_never_bfloat16(monkeypatch) -> None:
    import nipa.simulator.crossbar as crossbar

    both = {torch.float32: 1.0, torch.bfloat16: 0.3, torch.int8: 0.5}  # both timed faster than float32
    monkeypatch.setitem(crossbar._PRODUCT_SECONDS, "cpu", both)
    model = convert(nn.Linear(512, 4), HWConfig(subArray=512))  # partial sums up to 512: not exact in bf16
    assert model.core._product_dtype() == torch.int8
    monkeypatch.setenv("NIPA_INT8", "0")
    assert model.core._product_dtype() == torch.float32


@pytest.mark.parametrize("fastest", [torch.float32, torch.bfloat16, torch.int8])
def test_memory_budget_changes_no_number_in_any_format(fastest: torch.dtype, monkeypatch) -> None:
    """Integer cells: bit-identical outputs for any budget whatever the product format."""
    _force_fastest(monkeypatch, fastest)
    net = small_net(8)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=4, cellBit=2)
    x = torch.randn(6, 3, 8, 8)
    outputs = [run(convert(net, hw, memory_mb=memory_mb).eval(), x) for memory_mb in (1024, 0.03, 0.002)]
    assert all(torch.equal(other, outputs[0]) for other in outputs[1:])


def test_columns_cache_follows_the_cells(monkeypatch) -> None:
    """The low-precision copy of the cells is redone when the cells change (reprogramming, snapping)."""
    _force_fastest(monkeypatch, torch.int8)
    layer = nn.Linear(40, 6, bias=False)
    x = torch.randn(5, 40)
    model = convert(layer, HWConfig(subArray=16, ADCprecision=8, cellBit=2))
    first = run(model, x)
    model.core.conductance = model.core.conductance * 0  # a new buffer
    assert torch.equal(run(model, x), torch.zeros_like(first))
    model.core.program(0, 0)
    assert torch.equal(run(model, x), first)
    model.core.conductance.mul_(0)  # in place
    assert torch.equal(run(model, x), torch.zeros_like(first))


def test_budget_counts_bytes_of_the_product_format(monkeypatch) -> None:
    """A bfloat16 product holds twice the reads of a float32 one in the same budget (compiled kernels:
    no float32 copy), so fewer chunks."""
    monkeypatch.setenv("NIPA_COMPILE", "1")
    model = convert(nn.Linear(128, 64), HWConfig(subArray=128, ADCprecision=5))
    _force_fastest(monkeypatch, torch.float32)
    as_float = model.core._bytes_per_read()
    _force_fastest(monkeypatch, torch.bfloat16)
    as_bf16 = model.core._bytes_per_read()
    assert as_float == 4 * 7 * 64 + 4 * 64 + 4 * 128
    assert as_bf16 == 2 * 7 * 64 + 4 * 64 + 2 * 128


# ---- the compiled ADC chain ----------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("NIPA_SKIP_COMPILE") == "1", reason="NIPA_SKIP_COMPILE=1")
def test_compiled_adc_chain_equals_eager(monkeypatch) -> None:
    net = small_net(3)
    x = torch.randn(4, 3, 8, 8)
    hw = HWConfig(wl_weight=8, subArray=32, ADCprecision=5, vari=0.1)
    model = convert(net, hw, seed=1).eval()
    monkeypatch.setenv("NIPA_COMPILE", "0")
    eager = run(model, x)
    assert ADC_CHAIN.mode == "eager"
    monkeypatch.setenv("NIPA_COMPILE", "1")
    compiled = run(model, x)
    assert ADC_CHAIN.mode in ("compiled", "eager-fallback")
    import torch._dynamo.config as dynamo_config

    assert dynamo_config.recompile_limit >= 64  # chunk shapes and dtypes: more variants than dynamo's 8
    # Sums over slices may run in another order: equal up to float rounding and rare level flips.
    far = (compiled - eager).abs() > 1e-4 * eager.abs().max()
    assert far.float().mean() < 0.02


# ---- --compat: the original tool's choices -------------------------------------------------------


def test_compat_parsing() -> None:
    assert Compat.parse("original").switches == ["per_read", "signed_cells", "original_slices", "original_faults"]
    assert Compat.parse(None) == Compat() and Compat.parse("none") == Compat()
    assert Compat.parse("signed_cells,per_read").switches == ["per_read", "signed_cells"]
    assert Compat.parse("original,digital_classifier").switches == list(SWITCHES)
    with pytest.raises(CompatError, match="unknown name 'orignal'"):
        Compat.parse("orignal")


def test_compat_original_slices_drops_top_digits() -> None:
    assert Compat(original_slices=True).num_slices(9, 2) == 3 and Compat().num_slices(9, 2) == 4
    assert Compat(original_slices=True).num_slices(8, 1) == Compat().num_slices(8, 1) == 7
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[255.0, 64.0, 63.0, -100.0, 1.0, 0.0, -255.0, 17.0]]))
    hw = HWConfig(wl_weight=9, subArray=8, ADCprecision=24, cellBit=2)
    x = torch.eye(8) * 127  # read each weight alone
    exact = run(convert(layer, hw), x).squeeze(1)
    dropped = run(convert(layer, hw, compat=Compat(original_slices=True)), x).squeeze(1)
    scale = 127 * 255.0 / 255  # input 127 (scale 1) times the weight scale max |w| / (2^8 - 1)
    assert torch.allclose(exact, torch.tensor([255.0, 64, 63, -100, 1, 0, -255, 17]) * scale, atol=1e-3)
    # Only the low 6 magnitude bits survive: 255 -> 63, 64 -> 0, 100 -> 36.
    assert torch.allclose(dropped, torch.tensor([63.0, 0, 63, -36, 1, 0, -63, 17]) * scale, atol=1e-3)


def test_compat_signed_cells_have_no_leak_and_no_empty_cell_error() -> None:
    """A differential pair errs on its empty cell too (state-independent noise falls on both cells);
    one signed cell per slice does not hold a second cell."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    hw = HWConfig(subArray=64, ind_vari=0.1, vari_type="state_independent", onoffratio=3.0)
    pair = crossbar_cores(convert(layer, hw, seed=1))[0]
    signed = crossbar_cores(convert(layer, hw, seed=1, compat=Compat(signed_cells=True)))[0]
    ideal = pair._as_columns(pair.slices)
    pair_error = (pair.conductance - ideal).pow(2).mean()
    signed_error = (signed.conductance - ideal).pow(2).mean()
    assert pair_error == pytest.approx(2 * 0.1**2, rel=0.1)  # two noisy cells per weight
    assert signed_error == pytest.approx(0.1**2, rel=0.1)  # one
    # state-dependent variation: a zero slice has no conductance to vary in a signed cell.
    hw_dep = HWConfig(subArray=64, vari=0.2)
    signed_dep = crossbar_cores(convert(layer, hw_dep, seed=1, compat=Compat(signed_cells=True)))[0]
    zero = ideal == 0
    assert torch.equal(signed_dep.conductance[zero], ideal[zero])


def test_compat_original_faults() -> None:
    """Stuck-at-1 reads sign(value) (nothing on a zero cell), stuck-at-0 reads 1/onoffratio."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)
    hw = HWConfig(wl_weight=5, subArray=128, cellBit=2, SAF_prop=0.2, onoffratio=10.0)
    core = crossbar_cores(convert(layer, hw, seed=3, compat=Compat(signed_cells=True, original_faults=True)))[0]
    ideal = core._as_columns(core.slices)
    values = {round(v, 6) for v in torch.unique(core.conductance[ideal != core.conductance]).tolist()}
    assert values <= {-1.0, 0.1, 1.0}  # sign(value) or 1/onoffratio
    assert 0.1 in values and (1.0 in values or -1.0 in values)
    empty = core.conductance[ideal == 0]
    assert torch.all((empty == 0) | ((empty - 0.1).abs() < 1e-6))  # a zero cell only ever sticks at 0
    # Ours: stuck-at-1 is the top level G_max of a 2-bit cell, also on an empty cell of the pair.
    ours = crossbar_cores(convert(layer, hw, seed=3))[0]
    assert (ours.conductance - ideal).abs().max() >= 3 - 1e-4


def test_compat_digital_classifier() -> None:
    net = small_net(0)
    assert final_classifier(net) == "7"
    converted = convert(net, HWConfig(subArray=32), compat=Compat(digital_classifier=True))
    assert [c.name for c in crossbar_cores(converted)] == ["0", "2", "5"]
    assert isinstance(converted[7], nn.Linear)


def test_compat_per_read_switch_redraws() -> None:
    layer = nn.Linear(16, 4)
    x = torch.randn(8, 16)
    model = convert(layer, HWConfig(subArray=16, ADCprecision=8, vari=0.1), compat=Compat(per_read=True))
    assert model.core.per_read and not torch.equal(run(model, x), run(model, x))
