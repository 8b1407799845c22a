"""Ground truths other than top-1: perplexity and loss in validate.py and wrap_error.py (signed so that
agreement is positive), the built-in pydoc text task and its windows, and wrap_error's report per region
and of the worst points.

Hand-made records where the answer is known, and one tiny randomly initialised OPT (built from a config,
nothing downloaded) through main.py, stat.py, validate.py and wrap_error.py on a .txt text."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_llm import PIQA_ITEM, char_tokenizer, tiny_model, write_lines
from test_validate import POINTS, record, stats_file  # noqa: F401  (stats_file is a fixture)

import main
import validate
import wrap_error
from nipa.estimation.metric import nipa_metric
from nipa.hardware.config import HWConfig
from nipa.llm.tasks import (
    PYDOC_MAX_TOKENS,
    PerplexityTask,
    TaskFileError,
    dataset_id,
    load_task,
    parse_text_spec,
    pydoc_text,
    with_windows,
)
from nipa.pipelines.wrap import GroundTruth, PointTruth, compare, format_table
from nipa.results.correlation import RecordsError, group_records, measure_sign

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# validate.py: perplexity and loss
# ----------------------------------------------------------------------------------------------------


def lower_is_better_records(stats, direction: float, with_top1: bool) -> list[dict]:
    """Per point 2 chips whose perplexity falls (direction +1) or rises (-1) strictly with log2 NIPA; loss is
    log(perplexity). Without top-1 they look like an LLM text task's records."""
    values = np.log2(nipa_metric(stats, POINTS))
    out = []
    ideal = record(None, None, 98.0)
    ideal.update({"loss": math.log(20.0), "perplexity": 20.0})
    out.append(ideal)
    for point, value in zip(POINTS, values, strict=True):
        for chip in range(2):
            perplexity = 200.0 - direction * 5.0 * value + 1e-3 * chip
            rec = record(point, chip, 50.0 + value)
            rec.update({"perplexity": perplexity, "loss": math.log(perplexity)})
            if not with_top1:
                rec.update({"top1": None, "top5": None})
            out.append(rec)
    return out


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def validate_args(tmp_path: Path, stats_path: Path, *extra: str) -> list[str]:
    return ["--model_name", "smallcnn", "--dataset", "digits", "--records", str(tmp_path / "rec.jsonl"),
            "--stats", str(stats_path), "--out_dir", str(tmp_path / "out"), "--bootstrap", "50", "--no_plot", *extra]


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_perplexity_that_agrees_with_nipa_gives_tau_plus_one(tmp_path, stats_file, capsys, direction):  # noqa: F811
    stats_path, stats = stats_file
    write(tmp_path / "rec.jsonl", lower_is_better_records(stats, direction, with_top1=False))
    # the default measure (top-1) is refused with the option to use
    assert validate.main(validate_args(tmp_path, stats_path)) == 2
    assert "--measure perplexity" in capsys.readouterr().err
    assert validate.main(validate_args(tmp_path, stats_path, "--measure", "perplexity")) == 0
    printed = capsys.readouterr().out
    assert "sign -1" in printed and "-perplexity" in printed
    summary = json.loads((tmp_path / "out" / "digits_nipa_perplexity_summary.json").read_text())
    overall = summary["groups"][0]
    # lower perplexity at higher NIPA is agreement: +1; the reverse ordering -1
    assert overall["kendall"]["value"] == pytest.approx(direction)
    assert overall["spearman"]["value"] == pytest.approx(direction)
    assert summary["measure"] == "perplexity" and summary["sign"] == -1 and "lower perplexity" in summary["sign_note"]
    assert summary["ideal_perplexity"] == 20.0 and summary["loss_beside_accuracy"] is None
    assert not (tmp_path / "out" / "digits_nipa_summary.json").exists()  # top-1's file is not written
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "digits_nipa_perplexity_points.csv")
    assert {"perplexity_mean", "perplexity_std", "loss_mean"} <= set(table.columns)


def test_cnn_test_loss_is_reported_beside_top1_with_the_top1_files_unchanged(tmp_path, stats_file, capsys):  # noqa: F811
    stats_path, stats = stats_file
    write(tmp_path / "rec.jsonl", lower_is_better_records(stats, 1.0, with_top1=True))
    assert validate.main(validate_args(tmp_path, stats_path)) == 0
    assert "test loss beside top1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "digits_nipa_summary.json").read_text())
    assert summary["groups"][0]["kendall"]["value"] == pytest.approx(1.0)  # top-1 = 50 + log2 NIPA
    beside = summary["loss_beside_accuracy"]
    assert beside["sign"] == -1 and beside["groups"][0]["kendall"]["value"] == pytest.approx(1.0)
    assert summary["measure"] == "top1" and summary["sign"] == 1 and summary["y"] == "mean top1 over chips (%)"
    # --measure loss: its own files, the same ranking
    assert validate.main(validate_args(tmp_path, stats_path, "--measure", "loss")) == 0
    loss = json.loads((tmp_path / "out" / "digits_nipa_loss_summary.json").read_text())
    assert loss["groups"][0]["kendall"]["value"] == pytest.approx(1.0) and loss["ideal_loss"] == pytest.approx(
        math.log(20.0))


def test_group_records_needs_the_measure_it_is_asked_for():
    a = HWConfig()
    rec = record(a, 0, 90.0)
    assert group_records([rec], measure="top1").points[0].values("loss") == []
    with pytest.raises(RecordsError, match="no loss"):
        group_records([rec], measure="loss")
    assert measure_sign("perplexity") == -1 and measure_sign("top1") == 1


# ----------------------------------------------------------------------------------------------------
# wrap_error.py: per region, worst points, perplexity
# ----------------------------------------------------------------------------------------------------


def truth_and_records(simulated: list[float], predicted: list[float], ideal: float, measure: str = "top1"
                      ) -> tuple[GroundTruth, list[dict]]:
    points, records = [], []
    for i, (sim, pred) in enumerate(zip(simulated, predicted, strict=True)):
        config = HWConfig(ADCprecision=3 + i)
        # two chips around the mean, two draws around the prediction
        chips = [sim - 0.1, sim + 0.1]
        points.append(PointTruth(config, config.key(), top1=chips, wall_s=[1.0, 1.0], values={measure: chips}))
        records += [{"config_key": config.key(), "draw": d, measure: pred + delta} for d, delta in ((0, -0.05),
                                                                                                   (1, 0.05))]
    truth = GroundTruth(ideal_top1=ideal if measure == "top1" else None, points=points, run={}, source="x",
                        measure=measure, ideal={measure: ideal})
    return truth, records


def test_wrap_regions_and_worst_points_on_known_points():
    # float model 98: 4 points within 2 points of it, 3 further away
    simulated = [97.5, 96.5, 96.1, 97.0, 90.0, 80.0, 60.0]
    predicted = [97.0, 96.0, 96.5, 97.2, 93.0, 70.0, 61.0]
    truth, records = truth_and_records(simulated, predicted, 98.0)
    result = compare(truth, records, cycle=2)
    s = result["summary"]
    near, rest = s["regions"]["near_float"], s["regions"]["rest"]
    assert near["points"] == 4 and rest["points"] == 3
    assert near["mean_abs_error"] == pytest.approx((0.5 + 0.5 + 0.4 + 0.2) / 4)
    assert near["max_abs_error"] == pytest.approx(0.5) and rest["max_abs_error"] == pytest.approx(10.0)
    assert rest["mean_abs_error"] == pytest.approx((3 + 10 + 1) / 3)
    # near: of the 6 pairs two are discordant, (97.5, 97.0) against (97.0, 97.2) and (96.5, 96.1) against
    # (96.0, 96.5)
    assert near["kendall_tau"] == pytest.approx((4 - 2) / 6)
    assert rest["kendall_tau"] == pytest.approx(1.0)
    worst = s["worst_points"]
    assert len(worst) == 5 and [w["simulated"] for w in worst[:3]] == pytest.approx([80.0, 90.0, 60.0])
    assert worst[0]["error"] == pytest.approx(-10.0) and worst[0]["region"] == "rest"
    assert worst[0]["config"]["ADCprecision"] == 8 and worst[0]["predicted"] == pytest.approx(70.0)
    # top-1 keeps its keys
    assert s["mean_abs_error"] == pytest.approx(np.mean(np.abs(np.subtract(predicted, simulated))))
    assert "measure" not in s and s["ideal_top1"] == 98.0
    text = format_table(result)
    assert "per region" in text and "near_float    4 points" in text and "the 5 largest errors" in text


def test_wrap_region_with_fewer_than_three_points_has_no_tau():
    truth, records = truth_and_records([97.9, 97.0, 50.0], [97.0, 97.5, 40.0], 98.0)
    s = compare(truth, records, cycle=2)["summary"]
    assert s["regions"]["near_float"]["points"] == 2 and s["regions"]["near_float"]["kendall_tau"] is None
    assert s["regions"]["rest"]["kendall_tau"] is None and len(s["worst_points"]) == 3


def test_wrap_perplexity_reports_relative_errors_and_its_sign():
    # float perplexity 20: within 2% are 20.2 and 19.9; 30 and 45 are not
    truth, records = truth_and_records([20.2, 19.9, 30.0, 45.0], [20.0, 20.1, 33.0, 40.0], 20.0, "perplexity")
    s = compare(truth, records, cycle=2)["summary"]
    assert s["measure"] == "perplexity" and s["sign"] == 1 and "no sign change" in s["sign_note"]
    assert s["mean_abs_relative_error_pct"] == pytest.approx(
        np.mean([0.2 / 20.2, 0.2 / 19.9, 3 / 30, 5 / 45]) * 100)
    assert s["regions"]["near_float"]["points"] == 2 and s["regions"]["rest"]["points"] == 2
    assert s["kendall_tau"] == pytest.approx(2 / 3)  # one discordant pair of six: (20.2, 20.0) vs (19.9, 20.1)


# ----------------------------------------------------------------------------------------------------
# The pydoc text and the window options
# ----------------------------------------------------------------------------------------------------


def test_pydoc_task_is_deterministic_and_keeps_to_its_token_budget():
    tokenizer = char_tokenizer()
    text = pydoc_text()
    assert len(text) > 100_000 and text.startswith(text.split("\n")[0])
    first = load_task(with_windows("pydoc", 100, 1050), tokenizer)
    again = load_task("pydoc@seq_len=100,max_tokens=1050", tokenizer)
    assert isinstance(first, PerplexityTask) and first.windows == again.windows
    # non-overlapping windows covering exactly the first max_tokens tokens of the text
    assert [len(w) for w in first.windows] == [100] * 10 + [50]
    assert sum(first.windows, []) == tokenizer(text).input_ids[:1050]
    default = load_task("pydoc", tokenizer, limit=3)
    assert len(default) == 3 and all(len(w) == 512 for w in default.windows)  # --limit counts windows
    assert PYDOC_MAX_TOKENS == 32768 and dataset_id("pydoc") == "pydoc"
    assert dataset_id("pydoc@seq_len=100,max_tokens=1050") == "pydoc-seq100-tok1050"


def test_text_window_options_for_a_txt_file_and_their_errors(tmp_path, capsys):
    notes = tmp_path / "Notes.txt"
    notes.write_text("abc def " * 40)
    tokenizer = char_tokenizer()
    task = load_task(with_windows(str(notes), 16, None), tokenizer)
    assert [len(w) for w in task.windows] == [16] * 20
    assert dataset_id(with_windows(str(notes), 16, None)) == "notes-seq16"
    assert parse_text_spec("piqa") is None and parse_text_spec(str(notes)).seq_len is None
    with pytest.raises(TaskFileError, match="not seq_len=N"):
        parse_text_spec("pydoc@window=3")
    with pytest.raises(TaskFileError, match="perplexity text"):
        with_windows("quiz.jsonl", 16, None)
    # the scripts fold --seq_len/--max_tokens into the dataset's name, and refuse them elsewhere
    args = wrap_error.parse_args(["--model_name", str(tmp_path), "--dataset", "pydoc", "--max_tokens", "4096"])
    assert args.dataset == "pydoc@max_tokens=4096"
    with pytest.raises(SystemExit):
        wrap_error.parse_args(["--model_name", "smallcnn", "--dataset", "digits", "--seq_len", "64"])
    assert "--seq_len" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# A tiny language model end to end on a text
# ----------------------------------------------------------------------------------------------------

SPACE = """
[Algorithm_Level]
wl_weight = 4
wl_input = 6
[Hardware_Level]
subArray = 64
ADCprecision = 3, 4, 8
[Device_Level]
cellBit = 1
vari = 0.1
"""


def stat_script():
    spec = importlib.util.spec_from_file_location("nipa_stat_script_measures", ROOT / "stat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_llm_perplexity_through_main_validate_and_wrap_error(tmp_path, capsys):
    folder = tmp_path / "Tiny-OPT"
    tiny_model("opt", seed=3).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = tmp_path / "notes.txt"
    text.write_text("Question: is the crossbar exact? Answer: no, it is noisy.\n" * 12)
    (tmp_path / "space.ini").write_text(SPACE)
    model = ["--model_name", str(folder), "--dataset", str(text), "--seq_len", "32", "--max_tokens", "192"]
    records, stats = tmp_path / "accsim.jsonl", tmp_path / "stats.json"
    assert main.main([*model, "--HWdes", str(tmp_path / "space.ini"), "--cycle", "2", "--out", str(records),
                      "--device", "cpu"]) == 0
    sliced = [json.loads(line) for line in records.read_text().splitlines()]
    sliced = [r for r in sliced if r["method"] == "sliced"]
    assert len(sliced) == 6 and all(r["top1"] is None and r["perplexity"] > 1 for r in sliced)
    assert {r["dataset"] for r in sliced} == {"notes-seq32-tok192"} and sliced[0]["samples"] == 6
    assert sliced[0]["tokens"] == 6 * 31 and len(sliced[0]["text_sha256"]) == 64  # 192 tokens, 31 targets a window
    assert stat_script().main([*model, "--HWdes", str(tmp_path / "space.ini"), "--out", str(stats)]) == 0
    capsys.readouterr()
    val = [*model[:2], "--dataset", str(text), "--seq_len", "32", "--max_tokens", "192", "--records", str(records),
           "--stats", str(stats), "--out_dir", str(tmp_path / "val"), "--bootstrap", "20", "--no_plot"]
    assert validate.main([*val, "--measure", "perplexity"]) == 0
    summary = json.loads((tmp_path / "val" / "notes-seq32-tok192_nipa_perplexity_summary.json").read_text())
    assert summary["sign"] == -1 and summary["points"] == 3 and summary["groups"][0]["n"] == 3
    assert summary["ideal_perplexity"] > 1
    out = tmp_path / "wrap.jsonl"
    assert wrap_error.main([*model, "--ground_truth", str(records), "--out", str(out), "--cycle", "2",
                            "--time_points", "0", "--device", "cpu", "--measure", "perplexity"]) == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed and "per region" in printed and "largest errors" in printed
    wrap = json.loads((tmp_path / "wrap_perplexity_summary.json").read_text())
    assert wrap["points"] == 3 and wrap["measure"] == "perplexity" and wrap["mean_abs_relative_error_pct"] >= 0
    assert len(wrap["worst_points"]) == 3 and wrap["regions"]["near_float"]["points"] + wrap["regions"]["rest"][
        "points"] == 3
    # top-1 is refused for a text, saying what to give instead
    assert wrap_error.main([*model, "--ground_truth", str(records), "--out", str(out), "--cycle", "2",
                            "--time_points", "0", "--device", "cpu"]) == 2
    assert "--measure perplexity" in capsys.readouterr().err


def test_tiny_llm_multiple_choice_reports_the_loss_beside_top1(tmp_path, capsys):
    """A task that records top-1 and loss: wrap_error keeps top-1 as the headline (its keys and file) and
    reports the loss comparison beside it."""
    folder = tmp_path / "Tiny-OPT"
    tiny_model("opt", seed=3).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    quiz = write_lines(tmp_path / "quiz.jsonl", [PIQA_ITEM, {**PIQA_ITEM, "label": 1}] * 2)
    (tmp_path / "space.ini").write_text(SPACE)
    model = ["--model_name", str(folder), "--dataset", str(quiz)]
    records = tmp_path / "quiz_accsim.jsonl"
    assert main.main([*model, "--HWdes", str(tmp_path / "space.ini"), "--cycle", "1", "--out", str(records),
                      "--device", "cpu"]) == 0
    out = tmp_path / "quiz_wrap.jsonl"
    assert wrap_error.main([*model, "--ground_truth", str(records), "--out", str(out), "--cycle", "1",
                            "--time_points", "0", "--device", "cpu"]) == 0
    assert "test loss beside top-1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "quiz_wrap_summary.json").read_text())
    assert summary["points"] == 3 and "measure" not in summary and summary["regions"]["near_float"]["points"] >= 0
    beside = summary["loss_beside_top1"]
    assert beside["measure"] == "loss" and beside["points"] == 3 and beside["ideal_loss"] > 0
    assert beside["mean_abs_error"] >= 0 and len(beside["worst_points"]) == 3
