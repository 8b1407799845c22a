"""Accuracy of a classifier on a data loader, or of a language model on its task (nipa.llm.tasks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler
from tqdm import tqdm

from nipa.hardware.device_errors import chip_generator

# A test set up to this size is held on the device as tensors by `resident_batches`.
RESIDENT_MAX_MB = 1024.0

# How the chips of a sweep read the test set: "fixed", every chip in the file's order; "per_chip", chip c > 0
# in its own order (`chip_order`), so that a dynamic ADC range, which is one batch's, meets other batches.
TEST_ORDERS = ("fixed", "per_chip")
TEST_ORDER_STREAM = 0x7E57  # chip_generator stream of the test order (the layers use crc32 of their names)


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


def chip_order(data: Any, seed: int, chip: int) -> Any:
    """The test data in chip `chip`'s own order: chip 0 reads them as given; chip c > 0 in a permutation
    drawn from (seed, c), the same batch size (the last batch keeps its short size). `data` is a list of
    (inputs, labels) batches (`resident_batches`) or a DataLoader over a dataset; a language-model task
    has its own fixed batches and is refused."""
    if chip == 0:
        return data
    generator = chip_generator(seed, chip, TEST_ORDER_STREAM, "cpu", 0)
    if isinstance(data, DataLoader):
        order = torch.randperm(len(data.dataset), generator=generator).tolist()
        return DataLoader(data.dataset, batch_size=data.batch_size, sampler=order, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory)
    if not isinstance(data, list) or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in data):
        raise ValueError("a test order per chip needs (inputs, labels) batches or a DataLoader; this data "
                         f"({type(data).__name__}) has its own fixed batches")
    sizes = [len(labels) for _, labels in data]
    inputs = torch.cat([x for x, _ in data])
    labels = torch.cat([y for _, y in data])
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    inputs, labels = inputs[order], labels[order]
    return list(zip(inputs.split(sizes), labels.split(sizes), strict=True))


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
