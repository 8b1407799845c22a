"""nipa.runtime: TF32 off by default in every script (opt-in recorded), the default memory budget per
device, the device part of a sweep's settings, and scripts/run.sh's device choice and exit status."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch

from nipa.cli import add_runtime_args, run_main
from nipa.results.records import environment
from nipa.runtime import configure_precision, default_memory_mb, device_signature, tf32_enabled

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def _restore_precision():
    yield
    configure_precision(False)


def test_importing_the_project_leaves_tf32_off():
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert environment()["tf32"] is False


def _script(argv: list[str]) -> dict:
    seen: dict = {}

    def parse(args):
        parser = argparse.ArgumentParser()
        add_runtime_args(parser)
        return parser.parse_args(args)

    def run(args):
        seen.update(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32,
                    recorded=environment()["tf32"])
        return 0

    assert run_main("test", parse, run, argv) == 0
    return seen


@pytest.mark.usefixtures("_restore_precision")
def test_every_script_turns_tf32_off_unless_asked_and_records_it():
    torch.backends.cuda.matmul.allow_tf32 = True  # e.g. left on by something imported earlier
    torch.backends.cudnn.allow_tf32 = True
    assert _script([]) == {"matmul": False, "cudnn": False, "recorded": False}
    assert _script(["--allow_tf32"]) == {"matmul": True, "cudnn": True, "recorded": True}
    configure_precision(False)
    assert not tf32_enabled()


def test_default_memory_budget_is_256_mb_on_the_cpu():
    assert default_memory_mb("cpu") == 256
    assert default_memory_mb(torch.device("cpu")) == 256


def test_default_memory_budget_on_cuda_is_a_quarter_of_the_free_memory(monkeypatch):
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * 2**30))
    assert default_memory_mb("cuda:0") == pytest.approx(20 * 1024)
    free["bytes"] = 512 * 2**20  # a nearly full GPU: never below the CPU's budget
    assert default_memory_mb("cuda") == 256


def test_the_device_signature_names_the_gpu(monkeypatch):
    assert device_signature("cpu") == {"device_type": "cpu"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_signature("cuda:0") == {"device_type": "cuda", "gpu_name": "NVIDIA H200"}


def test_device_memory_budget_on_the_device(device):
    budget = default_memory_mb(device)
    assert budget >= 256
    if device.type == "cuda":
        assert budget == pytest.approx(max(256, torch.cuda.mem_get_info(device)[0] / 4 / 2**20), rel=0.05)


# ---- scripts/run.sh with a stand-in python that records how each shard was started -------------------

STUB = """#!/usr/bin/env bash
if [ "$1" = -c ]; then echo "${STUB_GPUS:-0}"; exit 0; fi
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} OMP_NUM_THREADS=${OMP_NUM_THREADS-unset} $*" >> calls.txt
case "$*" in *"--shard ${STUB_FAIL:-none}"*) exit 3;; esac
exit 0
"""


def _run_sh(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    (tmp_path / "scripts" / "run.sh").write_text((ROOT / "scripts" / "run.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(STUB)
    (bin_dir / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    environ.update(PATH=f"{bin_dir}:{environ['PATH']}", **env)
    done = subprocess.run(["bash", "scripts/run.sh"], cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, sorted(lines), done.stderr


def test_run_sh_cpu_shards_run_on_one_thread_and_a_failed_shard_fails_the_script(tmp_path):
    code, calls, err = _run_sh(tmp_path, NUM_SHARDS="3", STUB_FAIL="1/3")
    assert len(calls) == 3
    assert all("--device cpu" in c and "OMP_NUM_THREADS=1" in c for c in calls)
    assert code != 0 and "shard 1/3 failed (exit 3)" in err
    code, calls, _ = _run_sh(tmp_path, NUM_SHARDS="3")
    assert code == 0 and len(calls) == 3


def test_run_sh_puts_one_shard_on_each_gpu(tmp_path):
    code, calls, _ = _run_sh(tmp_path, NUM_SHARDS="2", STUB_GPUS="2")
    assert code == 0
    assert [c.split()[0] for c in calls] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    assert all("--device cuda" in c for c in calls)
    code, calls, _ = _run_sh(tmp_path, NUM_SHARDS="2", STUB_GPUS="2", CUDA_VISIBLE_DEVICES="5,7")
    assert [c.split()[0] for c in calls] == ["CUDA_VISIBLE_DEVICES=5", "CUDA_VISIBLE_DEVICES=7"]
    # More shards than GPUs: refused, not silently run on the CPU.
    code, calls, err = _run_sh(tmp_path, NUM_SHARDS="3", STUB_GPUS="2")
    assert code == 2 and calls == [] and "at most one shard per GPU" in err


def test_gpu_benchmark_script_is_valid_bash_and_refuses_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bench/gpu.sh would run the benchmarks")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2 and "no CUDA GPU visible" in done.stderr
    assert not (tmp_path / "out").exists()
