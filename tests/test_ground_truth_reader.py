"""The one reader of main.py records (nipa.results.ground_truth): validate's group_records and wrap_error's
load_ground_truth read a file with the same rules (a repeated chip once, two results for one chip, other
run settings or another model refused), and resume keys come from one builder (nipa.results.records)."""

from __future__ import annotations

import json
import math

import pytest

from nipa.errors import UserError
from nipa.hardware.config import HWConfig
from nipa.pipelines.wrap import load_ground_truth
from nipa.results.correlation import group_records
from nipa.results.ground_truth import MissingGroundTruth, RecordsError, read_ground_truth
from nipa.results.records import FAST_KEY, SWEEP_KEY, done_keys, read_records

RUN = {"model": "smallcnn", "dataset": "digits", "seed": 0}


def write(path, chips, point=None, run=None, model="smallcnn"):
    run = run or RUN
    point = point or HWConfig(vari=0.1)
    lines = [{"method": "ideal", "top1": 98.0, "run": run, "model": model, "dataset": "digits"}]
    lines += [{"method": "sliced", "config": point.to_dict(), "config_key": point.key(), "chip": chip, "top1": top1,
               "samples": 10, "run": run, "model": model, "dataset": "digits", "wall_s": 2.0 + chip}
              for chip, top1 in chips]
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_repeated_chip_counts_once_in_both_readers(tmp_path):
    path = write(tmp_path / "r.jsonl", [(0, 90.0), (1, 94.0), (1, 94.0)])
    truth = load_ground_truth(path, "smallcnn", "digits")
    assert truth.points[0].top1 == [90.0, 94.0]
    assert truth.points[0].wall_s == [2.0, 3.0]  # the chips' own seconds, the repeat not counted
    grouped = group_records(read_records(path))
    assert grouped.points[0].top1 == (90.0, 94.0) and grouped.duplicates == 1


def test_two_results_for_one_chip_are_refused(tmp_path):
    path = write(tmp_path / "r.jsonl", [(0, 90.0), (0, 91.0)])
    with pytest.raises(UserError, match="chip 0: two records"):
        load_ground_truth(path, "smallcnn", "digits")
    with pytest.raises(RecordsError, match="chip 0: two records"):
        group_records(read_records(path))


def test_both_readers_refuse_other_run_settings_and_another_model(tmp_path):
    mixed = write(tmp_path / "mixed.jsonl", [(0, 90.0)])
    write(mixed, [(1, 91.0)], run={**RUN, "seed": 1})
    with pytest.raises(RecordsError, match="run settings"):
        load_ground_truth(mixed, "smallcnn", "digits")
    with pytest.raises(RecordsError, match="run settings"):
        group_records(read_records(mixed))
    other = write(tmp_path / "other.jsonl", [(0, 90.0)], model="resnet18")
    with pytest.raises(RecordsError, match="model 'resnet18', not 'smallcnn'"):
        load_ground_truth(other, "smallcnn", "digits")


def test_points_come_in_key_order_whatever_the_record_order(tmp_path):
    a, b = HWConfig(vari=0.1), HWConfig(vari=0.2)
    forward = write(write(tmp_path / "f.jsonl", [(0, 90.0)], point=a), [(0, 80.0)], point=b)
    backward = write(write(tmp_path / "b.jsonl", [(0, 80.0)], point=b), [(0, 90.0)], point=a)
    keys = [p.key for p in load_ground_truth(forward, "smallcnn", "digits").points]
    assert keys == sorted(keys) == [p.key for p in load_ground_truth(backward, "smallcnn", "digits").points]
    assert keys == [p.key for p in read_ground_truth(backward).points]


def test_missing_and_empty_files_name_the_command(tmp_path):
    with pytest.raises(MissingGroundTruth, match="does not exist.*\n.*python main.py --x"):
        read_ground_truth(tmp_path / "none.jsonl", command="python main.py --x")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MissingGroundTruth, match="holds no record"):
        read_ground_truth(tmp_path / "empty.jsonl")
    ideal_only = tmp_path / "ideal.jsonl"
    ideal_only.write_text(json.dumps({"method": "ideal", "top1": 98.0, "run": RUN}) + "\n")
    with pytest.raises(MissingGroundTruth, match="no simulated hardware point"):
        read_ground_truth(ideal_only)


def test_resume_keys_of_the_sweep_and_the_fast_method():
    records = [{"method": "ideal", "config_key": None, "chip": None},
               {"method": "sliced", "config_key": "k", "chip": 2},
               {"method": "fast", "config_key": "k", "draw": 1}]
    assert done_keys(records, SWEEP_KEY) == {("ideal", None, None), ("sliced", "k", 2), ("fast", "k", None)}
    assert done_keys(records, FAST_KEY, method="fast") == {("k", 1)}
    assert math.isnan(group_records([{"method": "sliced", "config": HWConfig().to_dict(), "chip": 0,
                                      "top1": 1.0}]).points[0].wall_s[0])
