"""The "planes" form of the measured ADC error (nipa.estimation.plane_states): plane classes of a
convolution equal those of its crossbar rows, known reads get the simulator's exact error, mixed planes
its mean and power, and the calibration can read the simulator's own activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nipa.estimation.inject import AdcCalibration, InjectionModel, calibration_upstream, inject
from nipa.estimation.plane_states import (
    ALL_NEGATIVE,
    ALL_POSITIVE,
    ZERO,
    conv_plane_classes,
    linear_plane_classes,
    mixed_class,
    row_classes,
    tile_row_counts,
)
from nipa.hardware.config import HWConfig
from nipa.hardware.quant import tile_columns
from nipa.simulator.crossbar import convert, im2col


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_plane_classes_of_rows():
    """Per bit: no row sets it -> zero; every row sets it with one sign -> all positive / all negative;
    otherwise mixed, by how many rows set it (1, 2, 3-4, ...)."""
    rows = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # all zero
                         [5.0, 5.0, 5.0, 5.0],  # constant 101b
                         [-6.0, -6.0, -6.0, -6.0],  # constant -110b
                         [5.0, 0.0, 1.0, 0.0],  # bit 0 in 2 rows, bit 1 in none, bit 2 in 1
                         [3.0, 1.0, 7.0, 1.0],  # bit 0 everywhere, bit 1 in 2 rows, bit 2 in 1
                         [-1.0, 4.0, 4.0, 5.0]])  # bit 0 in 2 rows (signs differ), bit 2 in 3
    classes = row_classes(rows.view(6, 1, 4), 3, torch.tensor([4]))[:, 0].tolist()
    assert classes == [[ZERO, ZERO, ZERO],
                       [ALL_POSITIVE, ZERO, ALL_POSITIVE],
                       [ZERO, ALL_NEGATIVE, ALL_NEGATIVE],
                       [mixed_class(2), ZERO, mixed_class(1)],
                       [ALL_POSITIVE, mixed_class(2), mixed_class(1)],
                       [mixed_class(2), ZERO, mixed_class(3)]]
    assert [mixed_class(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [3, 4, 5, 5, 6, 6, 7]


@pytest.mark.parametrize("signed", [False, True])
def test_conv_plane_classes_are_those_of_the_crossbar_rows(signed):
    """Counted over a convolution's patches per tile (zero padding inside the patches, tiles that split
    a channel's kernel window, a short last tile), the classes are those of the im2col rows the crossbar
    reads."""
    torch.manual_seed(0)
    levels = torch.randint(-3 if signed else 0, 4, (2, 3, 6, 6)).float()
    levels[0, :, :3] = 0  # zero patches
    levels[1, :, 3:] = 2  # constant patches
    weight_shape, rows, bits = (5, 3, 3, 3), 10, 2  # fan-in 27: tiles of 10, 10, 7
    classes = conv_plane_classes(levels, bits, weight_shape, rows, (1, 1), (1, 1, 1, 1), (1, 1))
    patches = im2col(F.pad(levels, (1, 1, 1, 1)), (3, 3), (1, 1), (1, 1))  # [N, L, 27]
    expected = row_classes(tile_columns(patches.reshape(-1, 27), rows), bits, tile_row_counts(27, rows))
    got = classes.permute(0, 3, 4, 2, 1).reshape(-1, 3, bits)  # [N*L, T, Z]
    assert torch.equal(got, expected)
    assert {ZERO, ALL_POSITIVE}.issubset(set(got.unique().tolist())) and int(got.max()) > ALL_NEGATIVE


def test_strided_conv_plane_classes_are_those_of_the_rows():
    torch.manual_seed(6)
    levels = torch.randint(0, 8, (2, 4, 9, 9)).float()
    classes = conv_plane_classes(levels, 3, (3, 4, 3, 3), 16, (2, 2), (0, 0, 0, 0), (1, 1))
    patches = im2col(levels, (3, 3), (2, 2), (1, 1)).reshape(-1, 36)
    expected = row_classes(tile_columns(patches, 16), 3, tile_row_counts(36, 16))  # last tile: 4 rows
    assert torch.equal(classes.permute(0, 3, 4, 2, 1).reshape(-1, 3, 3), expected)


def test_linear_plane_classes_are_those_of_the_rows():
    torch.manual_seed(1)
    levels = torch.randint(-7, 8, (16, 20)).float()
    levels[:4] = 0
    levels[4:8] = -5
    classes = linear_plane_classes(levels, 3, 20, 8)  # [n, Z, T]
    expected = row_classes(tile_columns(levels, 8), 3, tile_row_counts(20, 8))  # [n, T, Z]
    assert torch.equal(classes.transpose(1, 2), expected)
    assert {ZERO, ALL_NEGATIVE}.issubset(set(expected.unique().tolist()))


def test_known_reads_get_the_simulators_exact_error():
    """Rows constant in every tile (zero, or one level of either sign) have only known reads: calibrated
    on the batch itself, the planes form gives the simulator's output exactly (a dynamic 3-bit ADC whose
    grid misses zero, three tiles, the last one short); the output form draws noise instead."""
    torch.manual_seed(2)
    layer = nn.Linear(20, 6, bias=False)
    hw = HWConfig(wl_weight=5, wl_input=5, subArray=8, ADCprecision=3, cellBit=2)
    values = torch.tensor([0.0, 15.0, -15.0, 6.0, -3.0, 1.0])
    tiles = values[torch.randint(0, len(values), (64, 3))]  # one value per (row, tile)
    x = torch.cat([tiles[:, :1].expand(-1, 8), tiles[:, 1:2].expand(-1, 8), tiles[:, 2:].expand(-1, 4)], dim=1)
    x[0, 0] = 15.0  # the largest level is 15: the input scale is 1 and the levels are the values
    x[0, 1:8] = 15.0
    simulated = convert(layer, hw)(x)
    calibration = AdcCalibration(layer, [x])
    planes = inject(layer, hw, errors=InjectionModel.of("planes"), calibration=calibration)
    ideal = inject(layer, hw, errors=InjectionModel(device="cells", adc="none"))
    assert not torch.allclose(simulated, ideal(x), atol=1e-3)  # the ADC does err here
    assert torch.allclose(planes(x), simulated, atol=1e-4, rtol=1e-5)
    output = inject(layer, hw, method="calibrated", calibration=calibration)
    assert not torch.allclose(output(x), simulated, atol=1e-3)


def test_mixed_planes_carry_the_simulators_error_power():
    """Unstructured inputs (every plane mixed): the planes form's error has the simulator's power."""
    torch.manual_seed(3)
    layer = nn.Linear(256, 64, bias=False)
    hw = HWConfig(wl_weight=8, wl_input=8, subArray=128, ADCprecision=4)
    x = torch.randn(256, 256)
    reference = inject(layer, hw, errors=InjectionModel(device="cells", adc="none"))(x)
    simulated = (convert(layer, hw)(x) - reference).pow(2).mean().item()
    calibration = AdcCalibration(layer, [torch.randn(256, 256)])
    predicted = sum((inject(layer, hw, method="planes", calibration=calibration, draw=d)(x) - reference)
                    .pow(2).mean().item() for d in range(3)) / 3
    assert 0.75 < predicted / simulated < 1.33


def test_calibration_on_the_simulators_activations():
    """upstream="simulated": the second layer is calibrated on the first layer's simulated outputs (a
    coarse ADC's offsets in them), so its tables differ from the ideal upstream's; the first layer's do
    not. The planes form asks for it; a bad value is an error."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    hw = HWConfig(wl_weight=5, wl_input=5, subArray=32, ADCprecision=3, cellBit=2)
    batches = [torch.randn(64, 32)]
    ideal = AdcCalibration(model, batches).errors(hw, planes=True)
    simulated = AdcCalibration(model, batches, upstream="simulated").errors(hw, planes=True)
    assert torch.equal(ideal["0"].planes[0], simulated["0"].planes[0])
    assert not torch.allclose(ideal["2"].planes[0], simulated["2"].planes[0])
    assert calibration_upstream(InjectionModel.of("planes")) == "simulated"
    assert calibration_upstream(InjectionModel.of("calibrated")) == "ideal"
    with pytest.raises(ValueError, match="upstream"):
        AdcCalibration(model, batches, upstream="chip")


def test_simulated_upstream_calibrates_each_adc_resolution_on_its_own_activations():
    """The simulator's activations depend on the point's ADC, so a prefetch of several resolutions must
    not measure them all on the first one's activations (it did): each equals a calibration of that
    resolution alone. On the ideal upstream one pass still serves them all. A chosen upstream wins over
    the form's; a bad one is an error."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    coarse, fine = (HWConfig(wl_weight=5, wl_input=5, subArray=32, ADCprecision=a, cellBit=2) for a in (3, 6))
    batches = [torch.randn(64, 32)]
    shared = AdcCalibration(model, batches, upstream="simulated")
    shared.prefetch([coarse, fine])
    shared.errors(fine)
    alone = AdcCalibration(model, batches, upstream="simulated").errors(coarse)
    assert torch.equal(shared.errors(coarse)["2"].output_power, alone["2"].output_power)
    assert shared.pass_key(coarse) != shared.pass_key(fine)
    ideal = AdcCalibration(model, batches)
    assert ideal.pass_key(coarse) == ideal.pass_key(fine)
    assert calibration_upstream(InjectionModel.of("calibrated"), "simulated") == "simulated"
    assert calibration_upstream(InjectionModel.of("planes"), "ideal") == "ideal"
    with pytest.raises(ValueError, match="upstream"):
        calibration_upstream(InjectionModel.of("calibrated"), "chip")


def test_planes_form_on_a_convolution_runs_and_repeats_per_draw():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2)).eval()
    hw = HWConfig(wl_weight=6, wl_input=6, subArray=40, ADCprecision=4, cellBit=2, vari=0.1)
    x = torch.randn(4, 3, 9, 9)
    calibration = AdcCalibration(model, [torch.randn(8, 3, 9, 9)], upstream="simulated")
    first = inject(model, hw, method="planes", calibration=calibration, draw=1)(x)
    again = inject(model, hw, method="planes", calibration=calibration, draw=1)(x)
    other = inject(model, hw, method="planes", calibration=calibration, draw=2)(x)
    assert first.shape == convert(model, hw)(x).shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
