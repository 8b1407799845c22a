"""Accuracy of a classifier on a data loader, or of a language model on its task (nipa.lm_tasks)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm


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
