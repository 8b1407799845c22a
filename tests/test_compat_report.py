"""The table of what each --compat switch changes (nipa.results.compat_report)."""

from __future__ import annotations

import json
from pathlib import Path

from nipa.hardware.config import HWConfig
from nipa.results.compat_report import compat_table, main


def write_records(path: Path, accuracies: dict[HWConfig, list[float]]) -> Path:
    run = {"model": "toy", "dataset": "toy", "seed": 0}
    lines = [{"method": "ideal", "top1": 98.0, "run": run, "model": "toy", "dataset": "toy"}]
    for point, chips in accuracies.items():
        for chip, top1 in enumerate(chips):
            lines.append({"method": "sliced", "config": point.to_dict(), "config_key": point.key(), "chip": chip,
                          "top1": top1, "samples": 100, "run": run, "model": "toy", "dataset": "toy"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_table_has_a_column_per_setting_and_the_chip_means(tmp_path) -> None:
    a, b = HWConfig(vari=0.1), HWConfig(vari=0.1, cellBit=2, wl_weight=9)
    ours = write_records(tmp_path / "none.jsonl", {a: [97.0, 96.0], b: [95.0, 95.0]})
    original = write_records(tmp_path / "original.jsonl", {a: [90.0, 92.0], b: [50.0, 52.0]})
    table = compat_table({"none": ours, "original": original})
    assert "float model: 98.00%" in table
    assert "| point | none | original |" in table
    row_a = next(line for line in table.splitlines() if line.startswith(f"| {a.describe()} |"))
    assert "96.50 +- 0.50 (2)" in row_a and "91.00 +- 1.00 (2)" in row_a
    row_b = next(line for line in table.splitlines() if line.startswith(f"| {b.describe()} |"))
    assert "95.00 +- 0.00 (2)" in row_b and "51.00 +- 1.00 (2)" in row_b


def test_missing_records_are_an_error(tmp_path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([f"none={empty}"]) == 2
    assert "no simulated point" in capsys.readouterr().err
