"""Results files: what is appended to, what is refused (never modified), torn and newline-less last lines."""

from __future__ import annotations

import json

import pytest

from nipa.errors import UserError
from nipa.results.records import RecordWriter, read_records

A, B = {"method": "ideal", "top1": 1.0}, {"method": "sliced", "top1": 2.0}


def lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_complete_last_record_without_newline_is_kept_and_its_line_ended(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(lines(A) + json.dumps(B))  # the newline of the last record was lost
    assert read_records(path) == [A, B]  # a record, not a torn line to simulate again
    writer = RecordWriter(path)
    writer.append({"method": "sliced", "top1": 3.0})
    assert read_records(path) == [A, B, {"method": "sliced", "top1": 3.0}]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 3


def test_torn_last_record_is_cut_off_with_a_warning(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(lines(A) + '{"method": "sli')
    with pytest.warns(UserWarning, match="torn last record"):
        assert read_records(path) == [A]
    with pytest.warns(UserWarning, match="removing a torn last record"):
        RecordWriter(path)
    assert path.read_text() == lines(A)


@pytest.mark.parametrize("content, where", [
    (lines(A) + "garbage\n", "r.jsonl:2: not a JSON record"),  # ends in a newline: not torn
    (lines(A) + "[1, 2]\n" + lines(B), "r.jsonl:2: a JSON list"),
    (lines(A) + "42", "r.jsonl:2: a JSON int"),
    ("some notes without a newline", "r.jsonl:1: not a JSON record"),
])
def test_lines_that_are_not_records_are_refused_and_the_file_kept(tmp_path, content, where):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    for action in (read_records, RecordWriter):
        with pytest.raises(UserError, match=where):
            action(path)
    assert path.read_text() == content


def test_binary_file_is_refused_untouched(tmp_path):
    path = tmp_path / "c.pt"
    data = b"PK\x03\x04\x00\x00\x08\x00\xff\xfe binary\nmore\x00bytes without a final newline"
    path.write_bytes(data)
    with pytest.raises(UserError, match="c.pt: not a results file"):
        RecordWriter(path)
    assert path.read_bytes() == data


def test_new_and_empty_files_are_results_files(tmp_path):
    RecordWriter(tmp_path / "sub" / "new.jsonl").append(A)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    RecordWriter(empty).append(B)
    assert read_records(tmp_path / "sub" / "new.jsonl") == [A] and read_records(empty) == [B]
