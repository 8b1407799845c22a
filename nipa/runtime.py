"""Where and how reproducibly things run: device selection and seeding, shared by every script."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from nipa.errors import UserError


def resolve_device(device: str = "auto", gpu_id: int | None = None) -> torch.device:
    """`auto` picks the first visible GPU when there is one, else the CPU. `--gpu_id N` picks GPU N
    among those visible (so `CUDA_VISIBLE_DEVICES=3 python main.py` and `--gpu_id 0` agree)."""
    if gpu_id is not None and gpu_id < 0:
        raise UserError(f"--gpu_id {gpu_id}: a GPU index is 0 or more")
    if device == "auto":
        if gpu_id is not None and not torch.cuda.is_available():  # never fall back to the CPU silently
            raise UserError(f"--gpu_id {gpu_id}: no GPU is available to this PyTorch build (torch "
                            f"{torch.__version__}); leave --gpu_id out to run on the CPU")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise UserError(f"--device {device}: CUDA is not available to this PyTorch build "
                               f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r}); use --device cpu")
        if device == "cuda" and gpu_id is not None:
            device = f"cuda:{gpu_id}"
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible; pick one of "
                            f"0..{torch.cuda.device_count() - 1}")
    elif device == "cpu" and gpu_id is not None:
        raise UserError(f"--gpu_id {gpu_id} with --device cpu: give one or the other")
    elif device != "cpu":
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_precision(allow_tf32: bool = False) -> None:
    """Full float32 matrix products and convolutions unless `allow_tf32`. This PyTorch lets cuDNN use
    TF32 by default: the ideal model, digital and injected layers would then carry about 5e-4 relative
    error that nothing models, and GPU numbers would differ from CPU ones. No effect on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


def tf32_enabled() -> bool:
    """Whether float32 products may run in TF32 now (recorded with results)."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


# Every process that imports the project computes in full float32 until it opts in (--allow_tf32).
configure_precision(False)


def use_deterministic_algorithms() -> None:
    """Deterministic kernels where PyTorch has them (pretrain.py --deterministic): on CUDA, e.g. the
    backward of AdaptiveAvgPool2d accumulates with atomics in a varying order otherwise. Ops without a
    deterministic kernel warn instead of failing. cuBLAS needs its workspace fixed before first use."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# Default budget of one crossbar product (--memory_mb) on a CPU, and the least on a GPU.
MIN_MEMORY_MB = 256.0


def default_memory_mb(device: torch.device | str) -> float:
    """--memory_mb when the user gives none: 256 MB on a CPU; on a GPU a quarter of its free memory
    (at least 256 MB), so that large batches take the one-pass product instead of computing it twice."""
    device = torch.device(device)
    if device.type != "cuda":
        return MIN_MEMORY_MB
    free, _total = torch.cuda.mem_get_info(device)
    return max(MIN_MEMORY_MB, free / 4 / 2**20)


def device_signature(device: torch.device | str) -> dict[str, Any]:
    """What of the device decides a sweep's numbers: its type, and on CUDA the GPU's name (kernels and
    random streams differ between devices)."""
    device = torch.device(device)
    signature: dict[str, Any] = {"device_type": device.type}
    if device.type == "cuda":
        signature["gpu_name"] = torch.cuda.get_device_name(device)
    return signature
