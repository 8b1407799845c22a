"""Shared fixtures: a small trained checkpoint on the offline digits, made once per test session, and
the devices a device-dependent test runs on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# Every test taking `device` runs on the CPU and, where one is visible, on CUDA (ids [cpu] / [cuda]:
# `pytest -k cuda` runs the GPU half, as bench/gpu.sh does).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device visible"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_ckpt_dir(tmp_path_factory) -> Path:
    """ckpts dir holding smallcnn_digits.pt trained for 3 quick epochs by pretrain.py itself."""
    import pretrain

    ckpt_dir = tmp_path_factory.mktemp("ckpts")
    assert pretrain.main(["--dataset", "digits", "--epochs", "3", "--ckpt_dir", str(ckpt_dir),
                          "--device", "cpu"]) == 0
    return ckpt_dir
