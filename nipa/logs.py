"""Readable progress lines to the terminal and, optionally, appended to a log file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm


def open_log(path: str | Path | None) -> Callable[[str], None]:
    """A `log(line)` function: prints (without breaking progress bars) and appends to `path`,
    flushed per line so nothing is lost if the run dies."""
    handle = None
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the script

    def log(line: str) -> None:
        tqdm.write(line)
        if handle is not None:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
            handle.flush()

    return log
