"""Checkpoints: build a model for a dataset, save and load it. The one loader every script uses, for the
project's CNNs (checkpoints under ckpts/) and for causal language models (nipa.llm.load, nipa.llm.tasks)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from nipa import __version__, paths
from nipa.errors import UserError
from nipa.llm.load import is_llm_name, llm_id, load_causal_lm, load_tokenizer, resolve_selection
from nipa.llm.tasks import dataset_id as lm_dataset_id
from nipa.llm.tasks import load_task
from nipa.paths import CHECKPOINT_DIR
from nipa.workloads.datasets import dataset_info, get_dataset, make_loader


def checkpoint_path(model_name: str, dataset: str, ckpt_dir: str | Path = CHECKPOINT_DIR) -> Path:
    return paths.checkpoint_path(model_name, dataset, ckpt_dir)


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
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); train it again with pretrain.py or give "
                        "another --ckpt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip, EOF and runtime errors for a damaged file
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'damaged file'}); it is not a checkpoint "
                        "torch can load: train it again with pretrain.py or give another --ckpt") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise UserError(f"{path}: not a nipa checkpoint (no 'state_dict' entry)")
    return payload


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str | None:
    """sha256 of a checkpoint file, or of the weight files of a model folder (names and contents, in
    name order): what ties records and statistics to the weights they came from. Computed once per
    file and process (keyed by size and modification time). None when there is no such file or folder
    (an LLM given by a model id of the transformers cache): the weights are then not checked."""
    path = Path(path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(
        f for pattern in ("*.safetensors", "*.bin", "*.gguf", "*.pt") for f in path.glob(pattern))
    if len(files) == 1 and files[0] == path:
        stat = path.stat()
        return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(file.name.encode())
        digest.update(_file_sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def weights_file(model_name: str, dataset: str, ckpt_dir: str | Path = CHECKPOINT_DIR,
                 ckpt: str | Path | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Where a model's weights are: a CNN's checkpoint, an LLM's .gguf file or folder (from the
    metadata load_causal_lm returns)."""
    if is_llm_name(model_name):
        meta = metadata or {}
        return Path(meta.get("source", model_name)) / meta.get("gguf_file", "")
    return Path(ckpt) if ckpt is not None else checkpoint_path(model_name, dataset, ckpt_dir)


def load_trained_model(model_name: str, dataset: str, ckpt_dir: str | Path = CHECKPOINT_DIR,
                       ckpt: str | Path | None = None,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of (model_name, dataset) in eval mode, and its checkpoint metadata.

    A missing checkpoint is an error that says which command makes it.
    """
    path = Path(ckpt) if ckpt is not None else checkpoint_path(model_name, dataset, ckpt_dir)
    if ckpt is not None and not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such file" + (" (it is a directory)" if path.is_dir() else "")
                                + "; check the path")
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint for {model_name} on {dataset} at {path}; train it first with\n"
            f"    python pretrain.py --model_name {model_name} --dataset {dataset}")
    payload = load_checkpoint(path)
    for key, expected in (("model", model_name.lower()), ("dataset", dataset)):
        if key in payload and payload[key] != expected:
            raise UserError(f"{path}: checkpoint is for {key} {payload[key]!r}, not {expected!r}; give the "
                            f"checkpoint of {model_name} on {dataset}")
    model = build_model(model_name, dataset)
    model.load_state_dict(payload["state_dict"])
    metadata = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(device).eval(), metadata


def test_loader(dataset: str, data_root: str | Path = "data", batch_size: int = 256,
                num_workers: int = 0, limit: int | None = None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The evaluation loader (fixed order, no augmentation); `limit` keeps the first N samples.
    `pin_memory` for a GPU: page-locked batches copy to it asynchronously."""
    data = get_dataset(dataset, "test", data_root=str(data_root), augment=False)
    if limit is not None and limit < len(data):
        data = torch.utils.data.Subset(data, range(limit))
    return make_loader(data, batch_size=batch_size, shuffle=False, seed=0, num_workers=num_workers,
                       pin_memory=pin_memory)


def model_id(model_name: str) -> str:
    """The model's name in result paths and records: a CNN's name, an LLM's folder/file name, or a user
    model's file stem and class (nipa.workloads.usermodel)."""
    from nipa.workloads.usermodel import is_user_model_name, user_model_id

    if is_user_model_name(model_name):
        return user_model_id(model_name)
    return llm_id(model_name) if is_llm_name(model_name) else model_name.lower()


def dataset_id(model_name: str, dataset: str) -> str:
    """The dataset's name in result paths and records (an LLM task file's stem, a user dataset's file or
    folder stem: nipa.workloads.userdata)."""
    from nipa.workloads.userdata import is_user_dataset, user_dataset_id

    if is_llm_name(model_name):
        return lm_dataset_id(dataset)
    return user_dataset_id(dataset) if is_user_dataset(dataset) else dataset


def statistics_path(model_name: str, dataset: str) -> Path:
    """Where stat.py writes, and validate.py and wrap_error.py read, a model's bit statistics."""
    return paths.statistics_path(model_id(model_name), dataset_id(model_name, dataset))


def results_path(model_name: str, dataset: str, kind: str) -> Path:
    """results/{model}/{dataset}_{kind}.jsonl: the records of main.py (accsim), wrap_error.py (wrap), ..."""
    return paths.results_path(model_id(model_name), dataset_id(model_name, dataset), kind)


def default_batch_size(model_name: str) -> int:
    """256 images for a CNN; 16 sequences for an LLM (its logits span the whole vocabulary)."""
    return 16 if is_llm_name(model_name) else 256


def load_model_and_data(model_name: str, dataset: str, *, ckpt_dir: str | Path = CHECKPOINT_DIR,
                        ckpt: str | Path | None = None, data_root: str | Path = "data",
                        batch_size: int | None = None, device: torch.device | str = "cpu",
                        num_workers: int = 0, limit: int | None = None):
    """(model, metadata, test data): what main.py, stat.py, validate.py and wrap_error.py start from.

    For a CNN the test data is a loader; for an LLM a task (nipa.llm.tasks) with the same `evaluate`
    role. The data are checked before the model is loaded, so a missing dataset fails first and fast."""
    batch_size = batch_size or default_batch_size(model_name)
    if is_llm_name(model_name):
        tokenizer = load_tokenizer(model_name)
        task = load_task(dataset, tokenizer, batch_size=batch_size, limit=limit)
        model, metadata = load_causal_lm(model_name, device)
        return model, metadata, task
    loader = test_loader(dataset, data_root, batch_size, num_workers, limit,
                         pin_memory=torch.device(device).type == "cuda")
    model, metadata = load_trained_model(model_name, dataset, ckpt_dir, ckpt, device)
    return model, metadata, loader


def calibration_inputs(model_name: str, dataset: str, data, batches: int, *, data_root: str | Path = "data",
                       batch_size: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    """`batches` input batches for ADC calibration: training images for a CNN (never the test set), the
    task's first items for an LLM (its only data)."""
    if batches <= 0:
        return []
    if hasattr(data, "calibration_inputs"):
        return data.calibration_inputs(batches)
    train = get_dataset(dataset, "train", str(data_root), augment=False)
    loader = make_loader(train, batch_size=batch_size or default_batch_size(model_name), shuffle=True, seed=seed)
    return [x for _, (x, _) in zip(range(batches), loader, strict=False)]


def layer_selection(model_name: str, model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str],
                    block: int | str | None = None) -> tuple[list[str] | None, list[str]]:
    """(include, exclude) patterns of the mapped layers: as given for a CNN; for an LLM the preset's
    block unless --include_layer is given (nipa.llm.load)."""
    if is_llm_name(model_name):
        return resolve_selection(model, include, exclude, block)
    if block is not None:
        raise UserError(f"--block {block}: only language models are organised in blocks; "
                         "use --include_layer / --exclude_layer")
    return (None if include is None else list(include)), list(exclude)
