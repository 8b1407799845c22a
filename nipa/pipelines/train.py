"""Training recipes and the training loop (pretrain.py, and later fine-tuning)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nipa.errors import UserError
from nipa.simulator.evaluate import evaluate


@dataclass
class Recipe:
    """Optimizer and schedule. CIFAR/ImageNet defaults are the original's recipe."""

    epochs: int = 200
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_size: int = 50  # StepLR period in epochs
    gamma: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


# Quick defaults for the small offline digit sets: a few seconds per epoch on a 2-core CPU.
DEFAULT_RECIPES = {
    "digits": Recipe(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, step_size=10, gamma=0.3),
    "mnist5k": Recipe(epochs=12, batch_size=64, lr=0.05, weight_decay=5e-4, step_size=4, gamma=0.3),
}


def default_recipe(dataset: str) -> Recipe:
    return DEFAULT_RECIPES.get(dataset, Recipe())


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise UserError(f"--optimizer {recipe.optimizer!r}: expected sgd or adam")


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device,
                    desc: str = "train") -> float:
    """One pass over the loader; returns the mean training loss."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    count = 0
    for inputs, labels in tqdm(loader, desc=desc, leave=False):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * labels.shape[0]
        count += labels.shape[0]
    return float(loss_sum) / max(count, 1)


def rng_states(device: torch.device | str) -> dict[str, object]:
    """The global random states a resumed run must continue: the CPU's, and the training GPU's when
    training on CUDA (dropout and some augmentations draw there)."""
    device = torch.device(device)
    states: dict[str, object] = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(state: dict, device: torch.device | str) -> None:
    """Set the states `rng_states` saved. torch.set_rng_state wants CPU ByteTensors, whatever device
    the file was loaded to; a CUDA state goes to the training GPU (a resume on the CPU ignores it)."""
    device = torch.device(device)
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def fit(model: nn.Module, train_loader, test_loader, recipe: Recipe, device: torch.device,
        resume_path: str | Path | None = None, log: Callable[[str], None] = print, seed: int | None = None) -> dict:
    """Train for `recipe.epochs`, evaluating after every epoch. With `resume_path`, the optimizer,
    schedule and epoch are saved there after every epoch and an interrupted run continues from it; a
    resume file of another recipe or `seed` is refused (the run would not be the one asked for)."""
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    start_epoch, history = 0, []
    resume_path = Path(resume_path) if resume_path else None
    if resume_path and resume_path.is_file():
        # On the CPU: the random states must stay CPU tensors; the model and optimizer states are
        # copied to the parameters' device by load_state_dict.
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        if state.get("recipe") != recipe.to_dict():
            raise UserError(f"{resume_path}: was written with another recipe {state.get('recipe')}; "
                            "delete it or pass the same options")
        if seed is not None and state.get("seed", seed) != seed:
            raise UserError(f"{resume_path}: an interrupted run with --seed {state['seed']}, not {seed}; resume "
                            f"it with --seed {state['seed']}, or delete the file to train with seed {seed}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state, device)
        if state.get("loader_rng") is not None and getattr(train_loader, "generator", None) is not None:
            train_loader.generator.set_state(state["loader_rng"])
        start_epoch, history = state["epoch"], state["history"]
        log(f"resuming from {resume_path} at epoch {start_epoch}")
    # The shuffling stream is saved too, so a resumed run sees the batches an uninterrupted one would.
    loader_generator = getattr(train_loader, "generator", None)
    started = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        loss = train_one_epoch(model, train_loader, optimizer, device, desc=f"epoch {epoch + 1}/{recipe.epochs}")
        scheduler.step()
        metrics = evaluate(model, test_loader, device)
        history.append({"epoch": epoch + 1, "train_loss": loss, **metrics})
        log(f"epoch {epoch + 1:3d}/{recipe.epochs}  loss {loss:.4f}  test top1 {metrics['top1']:.2f}%  "
            f"top5 {metrics['top5']:.2f}%  lr {scheduler.get_last_lr()[0]:.2e}  "
            f"{time.perf_counter() - started:.1f}s")
        if resume_path:
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = resume_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), **rng_states(device),
                        "loader_rng": loader_generator.get_state() if loader_generator is not None else None,
                        "epoch": epoch + 1, "history": history, "recipe": recipe.to_dict(), "seed": seed}, tmp)
            tmp.replace(resume_path)
    return {"history": history, "seconds": time.perf_counter() - started}
