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
from pathlib import Path
from typing import Any

import torch

from nipa import __version__


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


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a results file and its shards. A torn last line (a process killed while
    writing) is skipped with a warning; a torn line elsewhere is an error."""
    records = []
    for file in sibling_files(path):
        lines = file.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    warnings.warn(f"{file}:{number}: skipping a torn last record", stacklevel=2)
                    continue
                raise ValueError(f"{file}:{number}: not a JSON record: {exc}") from exc
    return records


class RecordWriter:
    """Appends records to a JSONL file, each flushed and synced to disk before returning."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A torn last line (a process killed while writing it) is no finished result: cut it off so
        # the next record starts on a clean line.
        if self.path.is_file() and self.path.stat().st_size > 0:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                warnings.warn(f"{self.path}: removing a torn last record ({len(data) - keep} bytes)",
                              stacklevel=2)
                with open(self.path, "r+b") as handle:
                    handle.truncate(keep)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def environment() -> dict[str, Any]:
    """Software and machine facts stored with every record."""
    return {"nipa_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "host": platform.node()}


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
