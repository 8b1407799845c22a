"""wrap_error's reader of main.py records counts a repeated chip once, as validate's reader does."""

from __future__ import annotations

import json

import pytest

from nipa.config import HWConfig
from nipa.correlation import group_records
from nipa.errors import UserError
from nipa.records import read_records
from nipa.wrap import load_ground_truth


def write(path, chips):
    run = {"model": "toy", "dataset": "toy", "seed": 0}
    point = HWConfig(vari=0.1)
    lines = [{"method": "ideal", "top1": 98.0, "run": run, "model": "toy", "dataset": "toy"}]
    lines += [{"method": "sliced", "config": point.to_dict(), "config_key": point.key(), "chip": chip, "top1": top1,
               "samples": 10, "run": run, "model": "toy", "dataset": "toy"} for chip, top1 in chips]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_repeated_chip_counts_once_in_both_readers(tmp_path):
    path = write(tmp_path / "r.jsonl", [(0, 90.0), (1, 94.0), (1, 94.0)])
    truth = load_ground_truth(path, "smallcnn", "digits")
    assert truth.points[0].top1 == [90.0, 94.0]
    assert group_records(read_records(path)).points[0].top1 == (90.0, 94.0)


def test_two_results_for_one_chip_are_refused(tmp_path):
    path = write(tmp_path / "r.jsonl", [(0, 90.0), (0, 91.0)])
    with pytest.raises(UserError, match="chip 0: two records"):
        load_ground_truth(path, "smallcnn", "digits")
