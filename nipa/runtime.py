"""Where and how reproducibly things run: device selection and seeding, shared by every script."""

from __future__ import annotations

import os
import random

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
