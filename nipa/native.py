"""nipa's C kernels: compiled at first use, cached, run on Python threads.

A kernel's source is compiled with the system C compiler (`$CC`, else `cc`/`gcc`) into a cache
(`$NIPA_CACHE_DIR`, else ~/.cache/nipa), keyed by the source, the flags, the compiler and the CPU (the
flags say -march=native). Callers fall back to PyTorch operations where no compiler works. ctypes
releases the GIL during a call, so a thread pool runs a kernel's tasks in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# No FMA contraction: every product and sum rounds as torch's do.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-Wno-psabi", "-shared", "-fPIC", "-std=gnu11")

_pool: ThreadPoolExecutor | None = None


def _forget_threads() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there (a child that kept
    the parent's would wait for them forever)."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (first processor in /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))  # one of each, in order


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    root = os.environ.get("NIPA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nipa")
    return Path(root) / "kernels"


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` (or find it in the cache) and load it; raises RuntimeError where that fails."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    flags = [*FLAGS, *extra_flags]
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), cc.encode(),
                                     cpu_signature().encode(), sys.platform.encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a private name, then rename: shards that start together never load a half-written file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([cc, *flags, str(source), "-o", str(built)],
                                    capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{cc} failed on {source}: {result.stderr.strip()[:500]}")
            os.replace(built, target)
    return ctypes.CDLL(str(target))


class Kernel:
    """One C kernel, built at its first use: `library` once built, `failure` why it could not be (then
    warned once, and its callers take their PyTorch path). The environment variable `switch`=0 turns it
    off."""

    def __init__(self, build: Callable[[], ctypes.CDLL], switch: str, unavailable: str) -> None:
        self.build, self.switch, self.unavailable = build, switch, unavailable  # unavailable: "... {reason} ..."
        self.library: ctypes.CDLL | None = None
        self.failure: str | None = None

    def available(self) -> bool:
        """True when the kernel is enabled and built (building it on the first call)."""
        if os.environ.get(self.switch, "1") != "1":
            return False
        if self.library is None and self.failure is None:
            try:
                self.library = self.build()
            except (OSError, RuntimeError) as exc:
                self.failure = str(exc)
                warnings.warn(self.unavailable.format(reason=self.failure), stacklevel=3)
        return self.library is not None


def workers() -> int:
    """Threads a kernel call may use: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def thread_pool(count: int) -> ThreadPoolExecutor:
    """The shared pool of `count` kernel threads."""
    global _pool
    if _pool is None or _pool._max_workers != count:
        _pool = ThreadPoolExecutor(count, thread_name_prefix="nipa-kernel")
    return _pool
