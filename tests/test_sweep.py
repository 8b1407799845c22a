"""main.py sweeps: records per chip, the ideal record once, resume without duplicates or loss,
shards that merge, seeds that reproduce, and bad input rejected before any work."""

from __future__ import annotations

import math
import re

import pytest

import main
import nipa.pipelines.sweep as sweep_module
from nipa.results.records import read_records

SMALL_SPACE = """
[Algorithm_Level]
wl_weight = 4, 6
wl_input = 6
[Hardware_Level]
subArray = 64
ADCprecision = 5
[Device_Level]
cellBit = 1
vari = 0.0, 0.2
"""


@pytest.fixture()
def space(tmp_path):
    path = tmp_path / "space.ini"
    path.write_text(SMALL_SPACE)
    return path


def run_main(ckpt_dir, space, out, *extra):
    return main.main(["--dataset", "digits", "--ckpt_dir", str(ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "0", "--cycle", "2", "--batch_size", "128", "--device", "cpu",
                      "--out", str(out), *extra])


def sliced(records):
    return sorted((r["config_key"], r["chip"], r["top1"]) for r in records if r["method"] == "sliced")


def test_sweep_writes_one_record_per_chip(digits_ckpt_dir, space, tmp_path):
    out = tmp_path / "r.jsonl"
    log = tmp_path / "r.log"
    assert run_main(digits_ckpt_dir, space, out, "--log_file", str(log)) == 0
    records = read_records(out)
    assert [r["method"] for r in records].count("ideal") == 1
    assert len(sliced(records)) == 4 * 2
    record = next(r for r in records if r["method"] == "sliced")
    for key in ("model", "dataset", "config", "chip", "seed", "top1", "samples", "wall_s", "mapped_layers",
                "nipa_version", "torch_version", "run"):
        assert key in record, key
    assert record["samples"] == 360 and record["mapped_layers"] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert "chip 1: top-1" in log.read_text()
    # Noise-free 6-bit points keep the accuracy near the ideal one; this is a sanity bound, not a target.
    ideal = next(r["top1"] for r in records if r["method"] == "ideal")
    clean = [r["top1"] for r in records if r["method"] == "sliced" and r["config"]["vari"] == 0
             and r["config"]["wl_weight"] == 6]
    assert all(abs(acc - ideal) < 10 for acc in clean)


def test_interrupted_sweep_resumes_without_duplicate_or_loss(digits_ckpt_dir, space, tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    assert run_main(digits_ckpt_dir, space, full) == 0

    cut = tmp_path / "cut.jsonl"
    real_evaluate = sweep_module.evaluate
    calls = {"n": 0}

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # ideal + 3 chips recorded, then the process dies
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate", dying_evaluate)
    assert run_main(digits_ckpt_dir, space, cut) == 130  # Ctrl-C: exit code 130, no traceback
    # ideal + 3 simulated chips, and any copied chip of a point without device error in between
    assert 4 <= len(read_records(cut)) < len(read_records(full))
    # A torn half-written line from the killed process must not break the resume.
    with open(cut, "a") as handle:
        handle.write('{"method": "sli')
    monkeypatch.setattr(sweep_module, "evaluate", real_evaluate)
    with pytest.warns(UserWarning, match="torn"):
        assert run_main(digits_ckpt_dir, space, cut) == 0
    resumed = read_records(cut)
    assert sliced(resumed) == sliced(read_records(full))  # same seed, same numbers, none twice
    assert [r["method"] for r in resumed].count("ideal") == 1


def test_shards_merge_into_the_full_sweep(digits_ckpt_dir, space, tmp_path):
    full = tmp_path / "full.jsonl"
    assert run_main(digits_ckpt_dir, space, full) == 0
    merged = tmp_path / "sharded.jsonl"
    for index in range(3):
        assert run_main(digits_ckpt_dir, space, merged, "--shard", f"{index}/3") == 0
    assert not merged.exists()  # only shard files are written
    assert len(list(tmp_path.glob("sharded.shard-*-of-3.jsonl"))) == 3
    records = read_records(merged)
    assert sliced(records) == sliced(read_records(full))
    assert [r["method"] for r in records].count("ideal") == 1


def test_other_settings_do_not_mix_into_one_file(digits_ckpt_dir, space, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert run_main(digits_ckpt_dir, space, out, "--limit", "64") == 0
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32") == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_ini_fails_before_any_work(digits_ckpt_dir, tmp_path, capsys):
    bad = tmp_path / "bad.ini"
    bad.write_text(SMALL_SPACE.replace("ADCprecision = 5", "ADCprecision = 5, 0"))
    out = tmp_path / "r.jsonl"
    assert run_main(digits_ckpt_dir, bad, out) == 2
    assert re.search(r"bad.ini.*\[Hardware_Level\] ADCprecision = 0", capsys.readouterr().err)
    assert not out.exists()


def test_sample_num_draws_distinct_points(digits_ckpt_dir, space, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main.main(["--dataset", "digits", "--ckpt_dir", str(digits_ckpt_dir), "--HWdes", str(space),
                      "--sample_num", "3", "--cycle", "1", "--device", "cpu", "--out", str(out),
                      "--limit", "64"]) == 0
    keys = [r["config_key"] for r in read_records(out) if r["method"] == "sliced"]
    assert len(keys) == len(set(keys)) == 3


def test_calibrated_adc_mode_runs(digits_ckpt_dir, space, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run_main(digits_ckpt_dir, space, out, "--adc_mode", "calibrated", "--limit", "64",
                    "--calib_batches", "1") == 0
    records = [r for r in read_records(out) if r["method"] == "sliced"]
    assert records and all(r["config"]["adc_mode"] == "calibrated" for r in records)
    dynamic = tmp_path / "dynamic.jsonl"
    assert run_main(digits_ckpt_dir, space, dynamic, "--adc_mode", "dynamic", "--limit", "64") == 0
    ideal = next(r["top1"] for r in read_records(out) if r["method"] == "ideal")
    # calibrated ranges work: finite losses, the noise-free 6-bit point near the float model ...
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(abs(r["top1"] - ideal) < 10 for r in records if r["config"]["wl_weight"] == 6
               and r["config"]["vari"] == 0)
    # ... and they are not the per-batch dynamic ranges under another name
    loss = {(r["config"]["wl_weight"], r["config"]["vari"], r["chip"]): r["loss"] for r in records}
    other = {(r["config"]["wl_weight"], r["config"]["vari"], r["chip"]): r["loss"]
             for r in read_records(dynamic) if r["method"] == "sliced"}
    assert loss.keys() == other.keys() and loss != other


def test_chips_of_a_noisy_point_differ_and_each_is_that_chip_converted_directly(digits_ckpt_dir, space, tmp_path):
    """The sweep programs chip c as convert(..., chip=c): not every chip as chip 0, not another seed."""
    from nipa.hardware.config import HWConfig
    from nipa.simulator.crossbar import convert
    from nipa.simulator.evaluate import evaluate
    from nipa.workloads.zoo import load_trained_model, test_loader

    out = tmp_path / "r.jsonl"
    assert run_main(digits_ckpt_dir, space, out, "--limit", "64", "--cycle", "3", "--seed", "5") == 0
    noisy = [r for r in read_records(out) if r["method"] == "sliced" and r["config"]["vari"] > 0
             and r["config"]["wl_weight"] == 6]
    assert sorted(r["chip"] for r in noisy) == [0, 1, 2]
    assert len({r["loss"] for r in noisy}) == 3  # three chips, three different draws
    model, _ = load_trained_model("smallcnn", "digits", digits_ckpt_dir)
    loader = test_loader("digits", batch_size=128, limit=64)
    for record in noisy:
        chip = convert(model, HWConfig.from_dict(record["config"]), seed=5, chip=record["chip"]).eval()
        direct = evaluate(chip, loader)
        assert (direct["top1"], direct["loss"]) == pytest.approx((record["top1"], record["loss"]), rel=1e-6)


@pytest.mark.parametrize("extra, field", [
    (["--seed", "1"], "'seed'"),
    (["--per_read"], "'per_read'"),
    (["--calib_batches", "2"], "'calib_batches'"),
    (["--ckpt", "OTHER"], "'weights'"),
])
def test_resuming_with_settings_that_change_numbers_is_refused(digits_ckpt_dir, space, tmp_path, capsys,
                                                               extra, field):
    import torch

    out = tmp_path / "r.jsonl"
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32") == 0
    before = out.read_bytes()
    if "OTHER" in extra:  # the same model with other weights
        payload = torch.load(digits_ckpt_dir / "smallcnn_digits.pt", weights_only=True)
        payload["state_dict"] = {k: v * 1.01 if v.is_floating_point() else v
                                 for k, v in payload["state_dict"].items()}
        torch.save(payload, tmp_path / "other.pt")
        extra = ["--ckpt", str(tmp_path / "other.pt")]
    capsys.readouterr()
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32", *extra) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and field in err
    assert out.read_bytes() == before
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32") == 0  # the same settings resume
    assert out.read_bytes() == before  # (nothing left to do)


def test_chips_of_points_without_device_error_are_copies_that_simulation_confirms(digits_ckpt_dir, space, tmp_path):
    copied = tmp_path / "copied.jsonl"
    assert run_main(digits_ckpt_dir, space, copied) == 0
    simulated = tmp_path / "simulated.jsonl"
    assert run_main(digits_ckpt_dir, space, simulated, "--simulate_identical_chips") == 0
    records = [r for r in read_records(copied) if r["method"] == "sliced"]
    copies = [r for r in records if "copied_from_chip" in r]
    # the two noise-free points (vari 0) have their chip 1 copied; the noisy ones are all simulated
    assert sorted((r["config"]["vari"], r["chip"]) for r in copies) == [(0.0, 1), (0.0, 1)]
    assert all(r["copied_from_chip"] == 0 and r["wall_s"] == 0 for r in copies)
    # and simulating those chips gives the very same numbers, as every other chip
    assert sliced(records) == sliced(read_records(simulated))
    loss = {(r["config_key"], r["chip"]): r["loss"] for r in records}
    assert loss == {(r["config_key"], r["chip"]): r["loss"] for r in read_records(simulated) if r["method"] == "sliced"}
    assert not any("copied_from_chip" in r for r in read_records(simulated))


def test_records_name_the_device_and_records_without_it_resume_on_a_cpu(digits_ckpt_dir, space, tmp_path,
                                                                         capsys):
    import json

    out = tmp_path / "r.jsonl"
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32") == 0
    records = read_records(out)
    assert all(r["run"]["device_type"] == "cpu" and "gpu_name" not in r["run"] for r in records)
    assert all(r["tf32"] is False and r["memory_mb"] == 256 for r in records)  # the CPU's default budget

    def rewrite(change) -> None:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        for row in rows:
            change(row["run"])
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))

    rewrite(lambda run: run.pop("device_type"))  # as written before the device was a setting
    before = out.read_bytes()
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32") == 0  # counts as a CPU sweep: resumes
    assert out.read_bytes() == before
    rewrite(lambda run: run.update(device_type="cuda", gpu_name="NVIDIA H200"))
    capsys.readouterr()
    assert run_main(digits_ckpt_dir, space, out, "--limit", "32") == 2
    err = capsys.readouterr().err
    assert "simulated on cuda (NVIDIA H200), this run is on cpu" in err and "--device" in err
    assert out.read_bytes() != before  # (the rewritten file, untouched by the refused run)


def test_a_test_set_held_on_the_device_gives_the_loaders_numbers(digits_ckpt_dir, device):
    import torch

    from nipa.hardware.config import HWConfig
    from nipa.simulator.crossbar import convert
    from nipa.simulator.evaluate import evaluate, resident_batches
    from nipa.workloads.zoo import load_trained_model, test_loader

    model, _ = load_trained_model("smallcnn", "digits", digits_ckpt_dir, device=device)
    loader = test_loader("digits", batch_size=64, limit=200, pin_memory=device.type == "cuda")
    held = resident_batches(loader, device)
    assert isinstance(held, list) and len(held) == len(loader)
    assert all(x.device.type == device.type for x, _ in held)
    assert evaluate(model, held, device) == evaluate(model, loader, device)
    chip = convert(model, HWConfig(wl_weight=6, wl_input=6, subArray=64, ADCprecision=5, vari=0.2),
                   seed=1, chip=0).to(device).eval()
    assert evaluate(chip, held, device) == evaluate(chip, loader, device)
    # Only a fixed-order loader of a set that fits is held; anything else is passed through.
    assert resident_batches(loader, device, max_mb=0.01) is loader
    shuffled = torch.utils.data.DataLoader(loader.dataset, batch_size=64, shuffle=True)
    assert resident_batches(shuffled, device) is shuffled
