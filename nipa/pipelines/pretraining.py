"""pretrain.py's pipeline: train a model on a dataset and save a checkpoint the other scripts load.

- A registry CNN on a built-in dataset: ckpts/{model}_{dataset}.pt (nipa.paths), found by every script
  without --ckpt; the training data are augmented as the original's recipe does.
- A user's model class (--model_name file.py:ClassName, --model_kwargs) and/or a user's dataset (an image
  folder or a tensor file, nipa.workloads.userdata): ckpts/{model id}_{dataset id}.pt unless --ckpt names the file;
  main.py, stat.py, validate.py and wrap_error.py then load it with --ckpt. Its train split trains, its
  test split only evaluates.

A checkpoint already there is loaded and evaluated instead of trained again (--retrain trains).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nipa import paths
from nipa.errors import UserError
from nipa.pipelines.train import Recipe, default_recipe, fit
from nipa.runtime import resolve_device, seed_everything, use_deterministic_algorithms
from nipa.simulator.evaluate import evaluate
from nipa.workloads.datasets import get_dataset, make_loader
from nipa.workloads.userdata import is_user_dataset
from nipa.workloads.usermodel import PYTHON_SPEC, is_user_model_name
from nipa.workloads.workload import UserWorkloadOptions
from nipa.workloads.zoo import build_model, checkpoint_path, load_trained_model, save_checkpoint


@dataclass
class PretrainSettings(UserWorkloadOptions):
    """What pretrain.py is asked (its options, by the same names)."""

    model_name: str = "smallcnn"
    dataset: str = "mnist5k"
    data_root: str = "data"
    download: bool = False
    ckpt_dir: str = paths.CHECKPOINT_DIR
    ckpt: str | None = None  # where to save (default nipa.paths.checkpoint_path)
    retrain: bool = False
    num_workers: int = 0
    deterministic: bool = False
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the dataset's recipe
    seed: int = 0
    device: str = "auto"
    gpu_id: int | None = None


def checked_recipe(settings: PretrainSettings) -> Recipe:
    """The dataset's default recipe with the given overrides; values that would fail late are refused."""
    recipe = dataclasses.replace(default_recipe(settings.dataset), **settings.recipe)
    for name in ("epochs", "batch_size", "step_size"):  # a zero would fail late (IndexError) or loop forever
        value = getattr(recipe, name, 1)
        if value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    if not recipe.lr > 0:
        raise UserError(f"--lr {recipe.lr}: the learning rate must be positive")
    return recipe


def run_pretrain(settings: PretrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the model, evaluate it on the test split; returns the checkpoint path and metrics."""
    recipe = checked_recipe(settings)
    if settings.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
        use_deterministic_algorithms()
    device = resolve_device(settings.device, settings.gpu_id)
    if is_user_model_name(settings.model_name) or is_user_dataset(settings.dataset):
        return _pretrain_workload(settings, recipe, device, log)
    path = Path(settings.ckpt) if settings.ckpt else checkpoint_path(settings.model_name, settings.dataset,
                                                                     settings.ckpt_dir)
    # Data first: a missing dataset must fail before anything else happens.
    train_set = get_dataset(settings.dataset, "train", settings.data_root, augment=True, download=settings.download)
    test_set = get_dataset(settings.dataset, "test", settings.data_root, augment=False, download=settings.download)

    if path.is_file() and not settings.retrain:
        model, meta = load_trained_model(settings.model_name, settings.dataset, ckpt=path, device=device)
        log(f"{path} exists (trained {meta.get('epochs')} epochs, seed {meta.get('seed')}); "
            "skipping training (--retrain to train again)")
    else:
        seed_everything(settings.seed)
        model = build_model(settings.model_name, settings.dataset).to(device)
        _train(settings, recipe, model, train_set, test_set, path, device, log,
               {"model": settings.model_name.lower(), "dataset": settings.dataset})
    return _evaluate(settings, recipe, model, test_set, path, device, log)


def _pretrain_workload(settings: PretrainSettings, recipe: Recipe, device: torch.device,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """A user's model class and/or a user's dataset, resolved as every other script resolves them."""
    from nipa.workloads.workload import Workload, check_inputs

    if is_user_model_name(settings.model_name) and not PYTHON_SPEC.match(settings.model_name):
        raise UserError(f"--model_name {settings.model_name}: pretrain.py trains a model class "
                        "(--model_name file.py:ClassName); a saved model (TorchScript, torch.export, pickle) "
                        "is evaluated by the other scripts as it is")
    workload = Workload.from_args(settings)
    path = Path(settings.ckpt) if settings.ckpt else paths.checkpoint_path(workload.model_id, workload.dataset_id,
                                                                           settings.ckpt_dir)
    train_set, test_set = workload.dataset_split("train"), workload.dataset_split("test")  # data first
    if path.is_file() and not settings.retrain:
        model, _ = dataclasses.replace(workload, ckpt=str(path)).load_model()
        model = model.to(device)
        log(f"{path} exists; skipping training (--retrain to train again)")
    else:
        seed_everything(settings.seed)
        model, _ = dataclasses.replace(workload, ckpt=None).load_model(random_init=True)
        check_inputs(model, test_set, settings.model_name, settings.dataset)  # before any training
        _train(settings, recipe, model.to(device), train_set, test_set, path, device, log,
               {"model": workload.model_id, "dataset": workload.dataset_id, "model_name": settings.model_name,
                "model_kwargs": workload.model_kwargs})
    return _evaluate(settings, recipe, model, test_set, path, device, log)


def _train(settings: PretrainSettings, recipe: Recipe, model: torch.nn.Module, train_set, test_set, path: Path,
           device: torch.device, log: Callable[[str], None], identity: dict[str, Any]) -> None:
    """fit() the model (resumable from {path}.resume.pt) and save the checkpoint with its metadata."""
    test_loader = make_loader(test_set, batch_size=recipe.batch_size, shuffle=False, seed=settings.seed,
                              num_workers=settings.num_workers)
    train_loader = make_loader(train_set, batch_size=recipe.batch_size, shuffle=True, seed=settings.seed,
                               num_workers=settings.num_workers)
    log(f"training {settings.model_name} on {settings.dataset} ({len(train_set)} train / {len(test_set)} test) "
        f"on {device}, seed {settings.seed}, recipe {recipe.to_dict()}")
    resume = path.with_suffix(".resume.pt")
    if settings.retrain and resume.is_file() and not path.is_file():
        log(f"continuing the interrupted run in {resume}")
    result = fit(model, train_loader, test_loader, recipe, device, resume_path=resume, log=log, seed=settings.seed)
    meta = {**identity, "num_classes": getattr(train_set, "num_classes", None),
            "input_shape": list(test_set[0][0].shape),
            "epochs": recipe.epochs, "seed": settings.seed, "recipe": recipe.to_dict(),
            "train_seconds": result["seconds"], "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": str(device), "deterministic": settings.deterministic}
    meta.update({f"test_{k}": v for k, v in result["history"][-1].items() if k in ("top1", "top5")})
    save_checkpoint(path, model, meta)
    resume.unlink(missing_ok=True)
    log(f"saved {path}")


def _evaluate(settings: PretrainSettings, recipe: Recipe, model: torch.nn.Module, test_set, path: Path,
              device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    test_loader = make_loader(test_set, batch_size=recipe.batch_size, shuffle=False, seed=settings.seed,
                              num_workers=settings.num_workers)
    metrics = evaluate(model, test_loader, device)
    log(f"{settings.model_name} on {settings.dataset}: test top-1 {metrics['top1']:.2f}%  top-5 "
        f"{metrics['top5']:.2f}%  ({metrics['samples']} images)")
    return {"checkpoint": str(path), **metrics}
