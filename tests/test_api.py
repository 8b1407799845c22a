"""The Python API: examples/own_model.py runs all four calls in a few seconds; results are plain values."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import nipa
from nipa.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_import_nipa_stays_light():
    import subprocess

    code = "import nipa, sys; print('torch' in sys.modules, callable(nipa.simulate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "True"]


def test_example_runs_all_four():
    spec = importlib.util.spec_from_file_location("own_model_example", ROOT / "examples" / "own_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main()
    assert result["ideal"] > 80  # trained for seconds on digits
    clean, noisy = result["simulated"]
    # 6-bit weights and inputs without variation stay near the float model (either side of it: rounding
    # can help by chance); variation 0.3 does not help
    assert abs(clean - result["ideal"]) < 3 and noisy <= clean + 1
    assert result["nipa"][0] > result["nipa"][1]  # device variation lowers NIPA
    assert all(0 <= a <= 100 for a in result["estimated"])


def test_single_point_and_tensor_pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    result = nipa.simulate(model, (x, y), {"wl_weight": 5, "subArray": 8}, chips=2)
    assert isinstance(result, nipa.api.SimulationResult) and len(result.accuracy) == 2
    stats = nipa.statistics(model, [(5, 8, 1)])
    assert isinstance(nipa.score(stats, {"wl_weight": 5, "subArray": 8}), float)
    with pytest.raises(UserError, match="no statistics for w6_s8_c1"):
        nipa.score(stats, {"wl_weight": 6, "subArray": 8})
    with pytest.raises(UserError, match="calibration"):
        nipa.estimate(model, (x, y), {"wl_weight": 5, "subArray": 8})
    published = nipa.estimate(model, (x, y), [{"wl_weight": 5, "subArray": 8}], draws=2, method="published")
    assert len(published) == 1 and len(published[0].accuracy) == 2


def test_estimate_says_how_far_to_trust_each_point():
    """A measured method returns each point's ADC error relative to the signal per layer: small at a fine
    ADC (trusted), large at a 2-bit one (untrusted); the published method has none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    fine, coarse = nipa.estimate(model, (x, y), [{"wl_weight": 6, "subArray": 16, "ADCprecision": 12},
                                                 {"wl_weight": 6, "subArray": 16, "ADCprecision": 2}],
                                 draws=1, calibration=x)
    assert set(fine.relative_adc_error) == {"0", "2"} and set(coarse.relative_adc_error) == {"0", "2"}
    assert fine.trusted is True and coarse.trusted is False
    assert max(fine.relative_adc_error.values()) < max(coarse.relative_adc_error.values())
    published = nipa.estimate(model, (x, y), {"wl_weight": 6, "subArray": 16}, draws=1, method="published")
    assert published.relative_adc_error is None and published.trusted is None


def test_estimate_simulates_the_untrusted_points_when_asked():
    """untrusted="simulate": the untrusted point's accuracies are simulated chips (seed + the fallback offset,
    as nipa.simulate gives them), its draws kept as `estimate`; a trusted point stays an estimate."""
    from nipa.pipelines.wrap import FALLBACK_SEED_OFFSET

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    points = [{"wl_weight": 6, "subArray": 16, "ADCprecision": 12},
              {"wl_weight": 6, "subArray": 16, "ADCprecision": 2, "vari": 0.2}]
    fine, coarse = nipa.estimate(model, (x, y), points, draws=2, calibration=x, seed=3, untrusted="simulate")
    plain = nipa.estimate(model, (x, y), points[1], draws=2, calibration=x, seed=3)
    assert fine.source == "estimate" and fine.estimate is None
    assert coarse.trusted is False and coarse.source == "simulated" and coarse.estimate == plain.accuracy
    chips = nipa.simulate(model, (x, y), points[1], chips=2, seed=3 + FALLBACK_SEED_OFFSET)
    assert coarse.accuracy == chips.accuracy
    with pytest.raises(UserError, match="no trust check"):
        nipa.estimate(model, (x, y), points[0], method="published", untrusted="simulate")
