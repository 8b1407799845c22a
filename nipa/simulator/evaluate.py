"""Accuracy of a classifier on a data loader, or of a language model on its task (nipa.llm.tasks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler
from tqdm import tqdm

# A test set up to this size is held on the device as tensors by `resident_batches`.
RESIDENT_MAX_MB = 1024.0


def resident_batches(loader: Any, device: torch.device | str, max_mb: float = RESIDENT_MAX_MB) -> Any:
    """The batches of a fixed-order DataLoader, read once and held on `device`, when the whole dataset
    fits in `max_mb`; otherwise (or for a shuffling loader, a language-model task) `loader` itself.
    The same batches in the same order, so every evaluation gives the numbers the loader would; a
    sweep then pays the data pipeline and the host-to-device copies once, not once per chip."""
    if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, SequentialSampler):
        return loader
    dataset = loader.dataset
    if len(dataset) == 0:
        return loader
    sample = dataset[0][0]
    if not isinstance(sample, torch.Tensor) or len(dataset) * sample.numel() * sample.element_size() > max_mb * 2**20:
        return loader
    return [(inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            for inputs, labels in loader]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", max_batches: int | None = None,
             progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy over the loader. A language-model task
    (anything with an `evaluate` method) evaluates itself: `top1` is its accuracy."""
    if hasattr(loader, "evaluate"):
        return loader.evaluate(model, device, progress=progress, desc=desc)
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    for i, (inputs, labels) in enumerate(tqdm(loader, desc=desc, leave=False, disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(inputs)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits1 += (top[:, 0] == labels).sum()
        hits5 += (top == labels[:, None]).any(dim=1).sum()
        total += labels.shape[0]
    # One synchronization at the end instead of one per batch.
    correct1, correct5 = int(hits1), int(hits5)
    if total == 0:
        raise ValueError("evaluation loader produced no samples")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total,
            "loss": float(loss_sum) / total, "samples": total}


def describe_metrics(metrics: dict) -> str:
    """The headline of an evaluation for a log line: top-1 (CNN), acc/acc_norm (multiple choice), perplexity."""
    if metrics.get("perplexity") is not None:
        return f"perplexity {metrics['perplexity']:.3f}"
    if metrics.get("acc_norm") is not None:
        return f"acc {metrics['top1']:.2f}%  acc_norm {metrics['acc_norm']:.2f}%"
    return f"top-1 {metrics['top1']:.2f}%"
