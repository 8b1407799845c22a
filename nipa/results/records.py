"""Results as records: one JSON object per line, appended and flushed as each one completes.

A sweep split with `--shard i/n` writes `<stem>.shard-i-of-n.jsonl` beside `<stem>.jsonl`; reading a
results file reads its shards too, so the shards merge without a separate step.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from nipa import __version__
from nipa.errors import UserError
from nipa.runtime import tf32_enabled


def shard_path(path: str | Path, shard: tuple[int, int] | None) -> Path:
    path = Path(path)
    if shard is None:
        return path
    index, count = shard
    return path.with_name(f"{path.stem}.shard-{index}-of-{count}{path.suffix}")


def sibling_files(path: str | Path) -> list[Path]:
    """The results file and its shard files, those that exist."""
    path = Path(path)
    files = [path] if path.is_file() else []
    return files + sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))


def _decode(file: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not a results file (not UTF-8 text: byte {exc.start}); "
                        "give another --out (or move the file away)") from None


def _parse_line(file: Path, number: int, line: str) -> dict[str, Any]:
    """One record, or a UserError naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}:{number}: not a JSON record ({exc.msg}); a results file holds one JSON "
                        "object per line: repair or move the file, or give another --out") from None
    if not isinstance(record, dict):
        raise UserError(f"{file}:{number}: a JSON {type(record).__name__}, not a record (a JSON object); "
                        "repair or move the file, or give another --out")
    return record


def parse_results(file: Path, data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """(records, torn_at) of one results file's bytes. Every line that ends in a newline must be a JSON
    object. A last line without one is a record when it parses as one (a newline lost, item kept), and
    a torn record (a process killed while writing it) when it starts like one: `torn_at` is then the
    byte offset where it starts. Anything else is a UserError: the file is not a results file."""
    text = _decode(file, data)
    if text.startswith("\ufeff"):
        raise UserError(f"{file}: starts with a byte-order mark: not a file nipa wrote; give another --out")
    lines = text.split("\n")
    last = lines.pop()  # "" when the file ends in a newline
    records = [_parse_line(file, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    torn_at = None
    if last.strip():
        try:
            records.append(_parse_line(file, len(lines) + 1, last))
        except UserError:
            if not last.lstrip().startswith("{"):
                raise
            torn_at = len(data) - len(last.encode("utf-8"))
    return records, torn_at


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a results file and its shards. A torn last line (a process killed while
    writing) is skipped with a warning; any other line that is not a JSON object is a UserError."""
    records = []
    for file in sibling_files(path):
        found, torn_at = parse_results(file, file.read_bytes())
        if torn_at is not None:
            warnings.warn(f"{file}: skipping a torn last record", stacklevel=2)
        records.extend(found)
    return records


def check_results_path(path: str | Path) -> Path:
    """`path` as a results file to append to: new, empty, or holding records only (else a UserError,
    the file untouched). Nothing is written here."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path}: is a directory; give a file name, e.g. {path / 'results.jsonl'}")
    if path.exists() and not path.is_file():
        raise UserError(f"--out {path}: not a regular file")
    if path.is_file():
        parse_results(path, path.read_bytes())
    return path


class RecordWriter:
    """Appends records to a JSONL file, each flushed and synced to disk before returning.

    The file is opened only when it is new, empty or holds records (check_results_path): a file of any
    other content is refused, never modified."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_results_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size > 0:
            data = self.path.read_bytes()
            _, torn_at = parse_results(self.path, data)
            if torn_at is not None:
                # A torn last line (a process killed while writing it) is no finished result: cut it off
                # so the next record starts on a clean line.
                warnings.warn(f"{self.path}: removing a torn last record ({len(data) - torn_at} bytes)",
                              stacklevel=2)
                with open(self.path, "r+b") as handle:
                    handle.truncate(torn_at)
            elif not data.endswith(b"\n"):
                # A complete last record whose newline was lost: keep it, end its line.
                with open(self.path, "ab") as handle:
                    handle.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# What identifies one result of a resumable run: a rerun skips the results whose key is recorded already.
SWEEP_KEY = ("method", "config_key", "chip")  # main.py: the ideal model, and every chip of every point
FAST_KEY = ("config_key", "draw")  # wrap_error.py: every injection draw of every point
FINETUNE_KEY = ("run_key", "method", "chip")  # finetune.py: every method on every chip of a variation


def resume_key(record: dict[str, Any], fields: Sequence[str]) -> tuple:
    """The values of `fields` in a record (None where absent), in order: its key among the results."""
    return tuple(record.get(name) for name in fields)


def done_keys(records: Iterable[dict[str, Any]], fields: Sequence[str], method: str | None = None) -> set[tuple]:
    """The resume keys of the records (of one `method` when given): the results a rerun skips."""
    return {resume_key(r, fields) for r in records if method is None or r.get("method") == method}


def environment() -> dict[str, Any]:
    """Software and machine facts stored with every record."""
    return {"nipa_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "host": platform.node(), "tf32": tf32_enabled()}


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
