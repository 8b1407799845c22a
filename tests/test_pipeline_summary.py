"""The summary the main job ends with (nipa.results.pipeline_summary)."""

from __future__ import annotations

import json

from nipa.results.pipeline_summary import main, pipeline_summary


def test_summary_reads_validate_and_wrap_outputs(tmp_path, capsys) -> None:
    (tmp_path / "toy_nipa_summary.json").write_text(json.dumps({
        "points": 3, "chips_total": 9, "ideal_top1": 98.0,
        "groups": [{"group": "all", "kendall": {"value": 0.8123, "ci_low": 0.61, "ci_high": 0.93}}]}))
    (tmp_path / "toy_nipa_points.csv").write_text("accuracy_mean\n96.5\n97.25\n91.0\n")
    rows = dict(pipeline_summary(tmp_path, "toy"))
    assert rows["simulated top-1 range"] == "91.00% to 97.25%"
    assert rows["NIPA vs simulated top-1, Kendall tau [CI]"] == "0.812 [0.61, 0.93]"
    assert "fast estimate speedup (measured in the same run)" not in rows  # no wrap_error run yet
    (tmp_path / "toy_wrap_summary.json").write_text(json.dumps({
        "mean_abs_error": 0.25, "max_abs_error": 1.5, "kendall_tau": 0.7, "timing": {"speedup": 31.4}}))
    rows = dict(pipeline_summary(tmp_path, "toy"))
    assert rows["fast estimate speedup (measured in the same run)"] == "31.4x"
    assert rows["fast estimate: mean / max absolute error"].startswith("0.25 / 1.50")


def test_missing_validate_output_names_the_command(tmp_path, capsys) -> None:
    assert main(["--results_dir", str(tmp_path)]) == 2
    assert "run validate.py first" in capsys.readouterr().err
