"""Checkpoints: build a model for a dataset, save and load it. The one loader every script uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from nipa import __version__
from nipa.data import dataset_info, get_dataset, make_loader

CHECKPOINT_DIR = "ckpts"


def checkpoint_path(model_name: str, dataset: str, ckpt_dir: str | Path = CHECKPOINT_DIR) -> Path:
    return Path(ckpt_dir) / f"{model_name.lower()}_{dataset}.pt"


def build_model(model_name: str, dataset: str) -> nn.Module:
    """An untrained model shaped for the dataset (input channels, classes)."""
    info = dataset_info(dataset)
    return models.get_model(model_name, in_channels=info.in_channels, num_classes=info.num_classes)


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """State dict plus metadata, written atomically (a crash never leaves half a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": state, **metadata, "nipa_version": __version__}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path}: not a nipa checkpoint (no 'state_dict' entry)")
    return payload


def load_trained_model(model_name: str, dataset: str, ckpt_dir: str | Path = CHECKPOINT_DIR,
                       ckpt: str | Path | None = None,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of (model_name, dataset) in eval mode, and its checkpoint metadata.

    A missing checkpoint is an error that says which command makes it.
    """
    path = Path(ckpt) if ckpt is not None else checkpoint_path(model_name, dataset, ckpt_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint for {model_name} on {dataset} at {path}; train it first with\n"
            f"    python pretrain.py --model_name {model_name} --dataset {dataset}")
    payload = load_checkpoint(path)
    for key, expected in (("model", model_name.lower()), ("dataset", dataset)):
        if key in payload and payload[key] != expected:
            raise ValueError(f"{path}: checkpoint is for {key} {payload[key]!r}, not {expected!r}")
    model = build_model(model_name, dataset)
    model.load_state_dict(payload["state_dict"])
    metadata = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(device).eval(), metadata


def test_loader(dataset: str, data_root: str | Path = "data", batch_size: int = 256,
                num_workers: int = 0, limit: int | None = None) -> torch.utils.data.DataLoader:
    """The evaluation loader (fixed order, no augmentation); `limit` keeps the first N samples."""
    data = get_dataset(dataset, "test", data_root=str(data_root), augment=False)
    if limit is not None and limit < len(data):
        data = torch.utils.data.Subset(data, range(limit))
    return make_loader(data, batch_size=batch_size, shuffle=False, seed=0, num_workers=num_workers)


def load_model_and_data(model_name: str, dataset: str, *, ckpt_dir: str | Path = CHECKPOINT_DIR,
                        ckpt: str | Path | None = None, data_root: str | Path = "data",
                        batch_size: int = 256, device: torch.device | str = "cpu",
                        num_workers: int = 0, limit: int | None = None):
    """(model, metadata, test loader): what main.py, stat.py, validate.py and wrap_error.py start from.
    The data are checked before the model is loaded, so a missing dataset fails first and fast."""
    loader = test_loader(dataset, data_root, batch_size, num_workers, limit)
    model, metadata = load_trained_model(model_name, dataset, ckpt_dir, ckpt, device)
    return model, metadata, loader
