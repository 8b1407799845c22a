"""The "repeated" form of the measured ADC error (nipa.estimation.repeated_rows): exact hashes of a
convolution's patches, the exact error of rows a layer reads again and again, and the stability test
that leaves a row whose error follows the batch's range to the noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nipa.estimation.inject import AdcCalibration, InjectionModel, calibration_upstream, inject
from nipa.estimation.repeated_rows import MIN_SHARE, RowTally, conv_hashes, hash_weights, match, row_hashes
from nipa.hardware.config import HWConfig
from nipa.simulator.crossbar import convert, im2col


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), (1, 1, 1, 1), (1, 1)),
                                                       ((2, 2), (0, 0, 0, 0), (1, 1)),
                                                       ((1, 2), (2, 1, 0, 2), (2, 1))])
def test_conv_hashes_are_those_of_the_crossbar_rows(stride, padding, dilation):
    """One float64 convolution hashes every patch exactly as the im2col row the crossbar reads (zero
    padding inside the patch, stride, dilation); integer sums below 2^53 leave no rounding."""
    torch.manual_seed(0)
    levels = torch.randint(-127, 128, (2, 3, 9, 8)).float()
    rows = im2col(F.pad(levels, padding), (3, 2), stride, dilation).reshape(-1, 18)
    for weights in (hash_weights("conv", 18), hash_weights("conv", 18, max_level=127)):
        got = conv_hashes(levels, weights, (3, 2), stride, padding, dilation)  # [2, n, OH, OW]
        assert torch.equal(got.reshape(2, -1).t(), row_hashes(rows, weights))
        assert torch.equal(got.double().reshape(2, -1).t(), row_hashes(rows.double(), weights.double()))  # exact
    assert hash_weights("conv", 18, max_level=127).dtype == torch.float32  # 18 * 127 * 2^12 < 2^24
    assert hash_weights("conv", 4608, max_level=127).dtype == torch.float64
    assert torch.equal(hash_weights("conv", 18), hash_weights("conv", 18))  # fixed per layer name


def test_match_finds_known_hashes_and_nothing_else():
    known = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    hashes = torch.tensor([[[3.0, 4.0], [1.0, 2.0]], [[1.0, 4.0], [5.0, 6.0]]]).permute(2, 0, 1)  # [2, 2, 2]
    assert match(hashes, known).tolist() == [[1, 0], [-1, -1]]  # both halves of the hash must agree


def _background_layer_and_images(seed: int = 0):
    """A 3x3 convolution over images with a constant background (two thirds of the patches are the
    same background patch) and random strokes."""
    torch.manual_seed(seed)
    layer = nn.Conv2d(1, 8, 3, padding=1, bias=False)
    images = torch.full((16, 1, 12, 12), -0.4)
    strokes = torch.rand(16, 1, 12, 12) < 0.05
    images[strokes] = torch.rand(int(strokes.sum())) * 2.5
    return layer, images


def test_repeated_rows_get_the_simulators_exact_error():
    """Calibrated on the batch itself (twice: one batch cannot show that a dynamic range's error is the
    row's), every background patch gets the simulator's own output (the same error, no noise), the other
    patches noise; the output form draws noise on the background too."""
    layer, x = _background_layer_and_images()
    hw = HWConfig(wl_weight=4, wl_input=4, subArray=64, ADCprecision=4, cellBit=3)
    simulated = convert(layer, hw)(x)
    assert inject(layer, hw, method="repeated", calibration=AdcCalibration(layer, [x])).core.repeated_hashes is None
    calibration = AdcCalibration(layer, [x, x])
    model = inject(layer, hw, method="repeated", calibration=calibration)
    assert model.core.repeated_hashes is not None and model.core.repeated_hashes.shape[0] >= 1
    background = (F.conv2d((x == -0.4).float(), torch.ones(1, 1, 3, 3), padding=1) == 9).squeeze(1)  # [n, H, W]
    assert background.float().mean() > 0.3
    ideal = inject(layer, hw, errors=InjectionModel(device="cells", adc="none"))(x)
    assert not torch.allclose(simulated, ideal, atol=1e-3)  # the ADC errs on the background
    repeated = model(x)
    on = background.unsqueeze(1).expand_as(simulated)
    assert torch.allclose(repeated[on], simulated[on], atol=1e-5)
    assert not torch.allclose(repeated[~on], simulated[~on], atol=1e-3)  # noise elsewhere
    output = inject(layer, hw, method="calibrated", calibration=calibration)(x)
    assert not torch.allclose(output[on], simulated[on], atol=1e-3)


def test_rows_whose_error_follows_the_batch_range_are_left_to_the_noise():
    """Two calibration batches whose dynamic ranges differ (the second holds a larger stroke): the
    background's error changes with the range, so it is no repeated row; with a fixed range (full) the
    same row's error is the same in both batches and it is one."""
    layer, x = _background_layer_and_images(1)
    other = x.clone()
    other[:, :, 5:7, 5:7] = 9.0
    hw = HWConfig(wl_weight=4, wl_input=4, subArray=64, ADCprecision=3, cellBit=3)
    dynamic = inject(layer, hw, method="repeated", calibration=AdcCalibration(layer, [x, other]))
    assert dynamic.core.repeated_hashes is None
    same = inject(layer, hw, method="repeated", calibration=AdcCalibration(layer, [x, x]))
    assert same.core.repeated_hashes is not None
    fixed = HWConfig(wl_weight=4, wl_input=4, subArray=64, ADCprecision=3, cellBit=3, adc_mode="full")
    full = inject(layer, fixed, method="repeated", calibration=AdcCalibration(layer, [x, other]))
    assert full.core.repeated_hashes is not None


def test_tally_keeps_frequent_stable_rows_and_pools_the_rest():
    """A row below MIN_SHARE or with a batch-dependent error joins the other rows' power, weighted by
    its count; a frequent stable row keeps its count-weighted mean error."""
    tally = RowTally()
    row = torch.zeros(1, 4)
    for error in (1.0, 1.02):
        tally.add_batch(1000, torch.cat([row, row + 1, row + 2]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
                        torch.tensor([500, 400, 2]),  # frequent-stable, frequent-unstable, rare
                        torch.tensor([[error, error], [1.0 if error == 1.0 else -1.0, 0.0], [5.0, 5.0]]),
                        torch.tensor([[error**2] * 2, [1.0, 1.0], [25.0, 25.0]]), torch.full((2,), 0.5))
    rows, hashes, errors, rest = tally.select(fixed_range=False)
    assert hashes.tolist() == [[1.0, 1.0]] and 2 < MIN_SHARE * 2000 < 400
    assert torch.allclose(errors, torch.full((1, 2), 1.01))
    # rest: 2 x 98 other rows at 0.5, 2 x 400 unstable at 1, 2 x 2 rare at 25
    assert torch.allclose(rest, torch.full((2,), (196 * 0.5 + 800 * 1.0 + 4 * 25.0) / 1000, dtype=torch.float64))
    assert torch.equal(rows[0], row[0])


def test_repeated_form_calibrates_on_the_simulators_activations():
    assert calibration_upstream(InjectionModel.of("repeated")) == "simulated"
    assert InjectionModel.of("repeated").slug() == "repeated"


def test_repeated_form_in_a_network_repeats_with_its_seed():
    """In a small CNN the form converts every layer (a linear layer has no repeated rows here) and the
    same seed and draw give the same outputs."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 5)).eval()
    _, x = _background_layer_and_images(2)
    hw = HWConfig(wl_weight=4, wl_input=4, subArray=64, ADCprecision=4, cellBit=3, vari=0.1)
    calibration = AdcCalibration(model, [x, x], upstream="simulated")
    first = inject(model, hw, method="repeated", calibration=calibration, seed=3, draw=1)
    again = inject(model, hw, method="repeated", calibration=calibration, seed=3, draw=1)
    assert first[0].core.repeated_hashes is not None
    assert torch.equal(first(x), again(x))
    assert not torch.equal(first(x), inject(model, hw, method="repeated", calibration=calibration, seed=3,
                                            draw=2)(x))


def test_a_linear_layers_repeated_rows_get_the_simulators_exact_error():
    """A linear layer over [batch, tokens, features] inputs where a padding row repeats: every padding
    row gets the simulator's own output."""
    torch.manual_seed(5)
    layer = nn.Linear(24, 6)
    x = torch.randn(4, 16, 24)
    x[:, 10:] = torch.linspace(-1, 1, 24)  # the same row at every padded position
    hw = HWConfig(wl_weight=5, wl_input=5, subArray=16, ADCprecision=4, cellBit=2)
    simulated = convert(layer, hw)(x)
    model = inject(layer, hw, method="repeated", calibration=AdcCalibration(layer, [x, x]))
    assert model.core.repeated_hashes is not None
    got = model(x)
    assert got.shape == simulated.shape
    assert torch.allclose(got[:, 10:], simulated[:, 10:], atol=1e-5)
    assert not torch.allclose(got[:, :10], simulated[:, :10], atol=1e-3)


def test_match_by_slots_equals_one_comparison_per_row():
    """Above 6 known rows the match goes through residue slots; it finds exactly what comparing with every
    known row finds, a first half that matches with a second that does not included."""
    import nipa.estimation.repeated_rows as repeated_rows

    torch.manual_seed(7)
    known = torch.randint(0, 2**23, (16, 2)).float()
    hashes = torch.randint(0, 2**23, (2, 8, 10, 10)).float()
    use = torch.rand(8, 10, 10) < 0.7
    pick = torch.randint(0, 16, (8, 10, 10))
    hashes[0][use], hashes[1][use] = known[pick[use], 0], known[pick[use], 1]
    hashes[1, 0, 0, :4] += 1
    by_slots = match(hashes, known)
    primes, repeated_rows._SLOT_PRIMES = repeated_rows._SLOT_PRIMES, ()
    try:
        assert torch.equal(by_slots, match(hashes, known))
    finally:
        repeated_rows._SLOT_PRIMES = primes
    assert (by_slots >= 0).sum() > 0 and (by_slots < 0).sum() > 0


def _reference_conv_error(y, x, scale_in, weights, known, errors, std, noise, kernel_size, stride, padding,
                          dilation):
    """The PyTorch path's operations (inject._InjectedLayer._repeated_error) on the same tensors."""
    index = match(conv_hashes(torch.round(x / scale_in), weights, kernel_size, stride, padding, dilation),
                  known.to(weights.dtype))  # [n, OH, OW]
    other = (index < 0).unsqueeze(1)
    table = F.pad(errors, (0, 0, 0, 1))
    exact = table[torch.where(index < 0, table.shape[0] - 1, index)].permute(0, 3, 1, 2)
    return y.clone().addcmul_(noise * other.float(), std.view(1, -1, 1, 1)).add_(exact)


@pytest.mark.parametrize("channels, kernel_size, stride, padding, dilation, max_level, rows", [
    (1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 127, 5),
    (3, (3, 2), (2, 1), (0, 1, 2, 0), (1, 2), 7, 16),
    (2, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 255, 1),
    (4, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), None, 31),  # float64 hash weights
])
def test_the_kernel_equals_the_pytorch_path_bit_for_bit(channels, kernel_size, stride, padding, dilation,
                                                        max_level, rows):
    """The C kernel's hash, match and error (nipa/estimation/repeated_rows.c) give the PyTorch operations'
    values exactly: zero padding, stride, dilation, both hash dtypes, up to the table's 31 rows, a known
    row whose second half does not match included."""
    from nipa.estimation.repeated_rows import conv_error, kernel_available

    if not kernel_available():
        pytest.skip("no C compiler")
    torch.manual_seed(8)
    levels = torch.randint(-3, 4, (6, channels, 11, 10)).float()
    levels[:, :, :, :5] = 1.0  # a constant region: patches that repeat
    scale_in = torch.tensor(0.037)
    x = levels * scale_in
    weights = hash_weights("kernel", channels * kernel_size[0] * kernel_size[1], max_level)
    hashes = conv_hashes(levels, weights, kernel_size, stride, padding, dilation)  # [2, n, OH, OW]
    flat = hashes.reshape(2, -1).t().unique(dim=0)
    known = flat[torch.randperm(flat.shape[0])[:rows]].clone()
    if rows > 1:  # a known row whose first half is that of a patch and whose second half is no patch's
        known[-1] = torch.stack([hashes[0, 0, 0, 0], hashes[1, 0, 0, 0] + 1])
        assert not bool(((flat[:, 0] == known[-1, 0]) & (flat[:, 1] == known[-1, 1])).any())
    out_channels = 5
    y = torch.randn(6, out_channels, *hashes.shape[2:])
    errors = torch.randn(known.shape[0], out_channels) * 0.1
    std = torch.rand(out_channels) * 0.05
    noise = torch.randn_like(y)
    args = (x, scale_in, weights, known, errors, std, noise, kernel_size, stride, padding, dilation)
    expected = _reference_conv_error(y, *args)
    assert bool((match(hashes, known.to(weights.dtype)) >= 0).any())
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):  # one task per share of the images: the same values on any thread count
            torch.set_num_threads(count)
            assert torch.equal(conv_error(y.clone(), *args), expected)
    finally:
        torch.set_num_threads(threads)


def test_a_network_gives_the_same_outputs_with_and_without_the_kernel(monkeypatch):
    """The whole forward of an injected convolution (stride 2, 'same' padding elsewhere) with the kernel
    and with NIPA_REPEATED_KERNEL=0 (the PyTorch operations): the same outputs, the same noise stream."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding="same"), nn.Flatten()).eval()
    _, x = _background_layer_and_images(3)
    hw = HWConfig(wl_weight=4, wl_input=4, subArray=64, ADCprecision=4, cellBit=3, vari=0.1)
    calibration = AdcCalibration(model, [x, x], upstream="simulated")
    import nipa.estimation.inject as inject_module

    calls = []
    kernel = inject_module.repeated_conv_error
    monkeypatch.setattr(inject_module, "repeated_conv_error", lambda *a: calls.append(1) or kernel(*a))
    injected = inject(model, hw, method="repeated", calibration=calibration, seed=1, draw=1)
    assert injected[0].core.repeated_hashes is not None
    with_kernel = [injected(x), injected(x)]
    assert calls  # the kernel ran
    monkeypatch.setenv("NIPA_REPEATED_KERNEL", "0")
    injected = inject(model, hw, method="repeated", calibration=calibration, seed=1, draw=1)
    assert all(torch.equal(a, injected(x)) for a in with_kernel)


def test_a_failed_kernel_build_falls_back_with_a_warning(monkeypatch):
    import nipa.estimation.repeated_rows as repeated_rows

    monkeypatch.setattr(repeated_rows._kernel, "library", None)
    monkeypatch.setattr(repeated_rows._kernel, "failure", None)

    def broken() -> None:
        raise RuntimeError("cc failed on repeated_rows.c: test")

    monkeypatch.setattr(repeated_rows, "_build", broken)
    with pytest.warns(UserWarning, match="kernel is unavailable"):
        assert not repeated_rows.kernel_available()
    layer, x = _background_layer_and_images()
    hw = HWConfig(wl_weight=4, wl_input=4, subArray=64, ADCprecision=4, cellBit=3)
    model = inject(layer, hw, method="repeated", calibration=AdcCalibration(layer, [x, x]))
    assert model(x).shape == (16, 8, 12, 12)  # the PyTorch operations
