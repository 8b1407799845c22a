"""A test order per chip (main.py --test_order per_chip): each chip reads the test set in its own order,
so a dynamic ADC range, which is one batch's, meets other batches; chips of a batch-dependent point are
then simulated, not copied, and the records say so."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import main
from nipa.hardware.config import HWConfig
from nipa.pipelines.sweep import identical_chips
from nipa.results.correlation import chips_wanted
from nipa.results.records import read_records
from nipa.simulator.evaluate import chip_order

SPACE = """
[Algorithm_Level]
wl_weight = 4
wl_input = 4
[Hardware_Level]
subArray = 64
ADCprecision = 3
ADCmode = {mode}
[Device_Level]
cellBit = 1
vari = 0.0
"""


def _batches(n: int = 70, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    y = torch.arange(n)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def test_chip_zero_keeps_the_order_and_other_chips_permute_with_the_same_batch_sizes():
    data = _batches()
    assert chip_order(data, seed=0, chip=0) is data
    first = chip_order(data, seed=0, chip=1)
    assert [len(y) for _, y in first] == [len(y) for _, y in data]
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == list(range(70)) and labels.tolist() != list(range(70))
    assert all(torch.equal(x.view(-1).long(), y) for x, y in first)  # inputs travel with their labels
    again = chip_order(data, seed=0, chip=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))  # reproducible
    other_chip = torch.cat([y for _, y in chip_order(data, seed=0, chip=2)])
    other_seed = torch.cat([y for _, y in chip_order(data, seed=1, chip=1)])
    assert not torch.equal(other_chip, labels) and not torch.equal(other_seed, labels)


def test_a_loader_is_reordered_like_its_batches():
    data = _batches()
    x = torch.cat([b[0] for b in data])
    loader = DataLoader(TensorDataset(x, torch.arange(70)), batch_size=16)
    from_loader = torch.cat([y for _, y in chip_order(loader, seed=3, chip=4)])
    from_batches = torch.cat([y for _, y in chip_order(data, seed=3, chip=4)])
    assert torch.equal(from_loader, from_batches)


def test_data_with_its_own_batches_is_refused():
    class Task:
        def evaluate(self, *args, **kwargs):
            return {}

    with pytest.raises(ValueError, match="fixed batches"):
        chip_order(Task(), seed=0, chip=1)


@pytest.mark.parametrize("mode, differ", [("dynamic", True), ("dynamic_tile", True), ("calibrated", False),
                                          ("full", False)])
def test_only_a_batch_dependent_adc_makes_noise_free_chips_differ(mode, differ):
    point = HWConfig(adc_mode=mode)
    assert identical_chips(point, "fixed")
    assert identical_chips(point, "per_chip") is not differ
    noisy = HWConfig(adc_mode=mode, vari=0.1)
    assert not identical_chips(noisy, "fixed") and not identical_chips(noisy, "per_chip")
    # explore.py --verify adds chips to a point whose chips differ until its standard error is reached (std 4
    # over 3 chips: its bound asks for far more than max_cycle)
    wanted = chips_wanted([50.0, 54.0, 46.0], not identical_chips(point, "per_chip"), 3, 20, 0.25)
    assert wanted == (20 if differ else 3)


def _run(ckpt_dir, space, out, *extra):
    return main.main(["--dataset", "digits", "--ckpt_dir", str(ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "0", "--cycle", "3", "--batch_size", "32", "--device", "cpu",
                      "--out", str(out), *extra])


def test_per_chip_order_simulates_the_chips_of_a_dynamic_point(digits_ckpt_dir, tmp_path, capsys):
    space = tmp_path / "space.ini"
    space.write_text(SPACE.format(mode="dynamic"))
    fixed, per_chip = tmp_path / "fixed.jsonl", tmp_path / "per_chip.jsonl"
    assert _run(digits_ckpt_dir, space, fixed) == 0
    assert _run(digits_ckpt_dir, space, per_chip, "--test_order", "per_chip") == 0
    fixed_chips = [r for r in read_records(fixed) if r["method"] == "sliced"]
    chips = [r for r in read_records(per_chip) if r["method"] == "sliced"]
    assert [("copied_from_chip" in r) for r in fixed_chips] == [False, True, True]
    assert not any("copied_from_chip" in r for r in chips)
    assert chips[0]["top1"] == fixed_chips[0]["top1"]  # chip 0 reads the file's order
    # a 3-bit dynamic ADC at batch 32: another batch composition gives another loss
    assert len({round(r["loss"], 6) for r in chips}) == 3
    assert all(r["run"]["test_order"] == "per_chip" for r in chips)
    assert "test_order" not in fixed_chips[0]["run"]  # files from before the option keep their settings
    capsys.readouterr()
    assert _run(digits_ckpt_dir, space, fixed, "--test_order", "per_chip") == 2  # never mixed into one file
    assert "test_order" in capsys.readouterr().err


def test_per_chip_order_copies_the_chips_of_a_calibrated_point(digits_ckpt_dir, tmp_path):
    space = tmp_path / "space.ini"
    space.write_text(SPACE.format(mode="calibrated"))
    out = tmp_path / "r.jsonl"
    assert _run(digits_ckpt_dir, space, out, "--test_order", "per_chip") == 0
    chips = [r for r in read_records(out) if r["method"] == "sliced"]
    assert [("copied_from_chip" in r) for r in chips] == [False, True, True]
