"""What is evaluated, resolved once from the command line: the model, its test data, its calibration data,
the ids used in result paths and records, and the description records store.

Three kinds, one constructor each: `Workload.registry_cnn` (a CNN of models.MODEL_NAMES with a checkpoint
of ckpts/), `Workload.user_model` (a user's model file, nipa.workloads.usermodel) and `Workload.language_model`
(nipa.llm.load). Either CNN kind takes a built-in dataset (nipa.workloads.datasets) or the user's own
(nipa.workloads.userdata).
`Workload.from_args` picks the kind from `--model_name`. The registry and LLM paths call the functions of
nipa.workloads.zoo they always did, so their records and result paths are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nipa import paths
from nipa.errors import UserError
from nipa.workloads.userdata import ImageOptions, is_user_dataset, parse_size, user_dataset_sha256
from nipa.workloads.usermodel import file_sha256, is_user_model_name, load_fitting_state_dict, load_user_model

KINDS = ("cnn", "user", "llm")


@dataclass
class UserWorkloadOptions:
    """The options of a user's own model or data that every script's settings carry, by the option names
    (`Workload.from_args` reads them): `--model_kwargs`, `--allow_pickle`, `--input_size`, `--mean`,
    `--std`, `--split`."""

    model_kwargs: str | None = None  # JSON
    allow_pickle: bool = False
    input_size: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    split: float | None = None


@dataclass
class Workload:
    """One model on one dataset, as every script evaluates it (see the module docstring)."""

    kind: str
    model_name: str
    dataset: str
    ckpt: str | None = None
    ckpt_dir: str = "ckpts"
    data_root: str = "data"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False
    image: ImageOptions = field(default_factory=ImageOptions)
    split: float | None = None  # train share of a tensor file holding one set
    seed: int = 0  # of the --split permutation

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def registry_cnn(cls, model_name: str, dataset: str, **options: Any) -> Workload:
        return cls("cnn", model_name, dataset, **options)

    @classmethod
    def user_model(cls, model_name: str, dataset: str, **options: Any) -> Workload:
        return cls("user", model_name, dataset, **options)

    @classmethod
    def language_model(cls, model_name: str, dataset: str) -> Workload:
        return cls("llm", model_name, dataset)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        """The workload of a script's options (those it lacks take their defaults)."""
        from nipa.llm.load import is_llm_name
        from nipa.workloads.usermodel import parse_model_kwargs

        def floats(option: str) -> tuple[float, ...] | None:
            values = getattr(args, option, None)
            return None if values is None else tuple(float(v) for v in values)

        name, dataset = args.model_name, args.dataset
        if is_llm_name(name):
            return cls.language_model(name, dataset)
        options = {"ckpt": getattr(args, "ckpt", None), "ckpt_dir": getattr(args, "ckpt_dir", "ckpts"),
                   "data_root": getattr(args, "data_root", "data"),
                   "image": ImageOptions(parse_size(getattr(args, "input_size", None)), floats("mean"), floats("std")),
                   "split": getattr(args, "split", None), "seed": getattr(args, "seed", 0)}
        if is_user_model_name(name):
            return cls.user_model(name, dataset, model_kwargs=parse_model_kwargs(getattr(args, "model_kwargs", None)),
                                  allow_pickle=bool(getattr(args, "allow_pickle", False)), **options)
        if getattr(args, "model_kwargs", None):
            raise UserError(f"--model_kwargs: applies to a model file (file.py:ClassName), not to {name}")
        return cls.registry_cnn(name, dataset, **options)

    # -- ids and description -----------------------------------------------------------------------

    @property
    def user_data(self) -> bool:
        return self.kind != "llm" and is_user_dataset(self.dataset)

    @property
    def model_id(self) -> str:
        from nipa.workloads.zoo import model_id

        return model_id(self.model_name)

    @property
    def dataset_id(self) -> str:
        from nipa.workloads.zoo import dataset_id

        return dataset_id(self.model_name, self.dataset)

    def results_path(self, kind: str) -> Path:
        """results/{model}/{dataset}_{kind}.jsonl (kind: accsim, wrap, finetune, ...)."""
        return paths.results_path(self.model_id, self.dataset_id, kind)

    def statistics_path(self) -> Path:
        return paths.statistics_path(self.model_id, self.dataset_id)

    @property
    def default_batch_size(self) -> int:
        return 16 if self.kind == "llm" else 256

    def checkpoint(self) -> Path | None:
        """The weights file given or expected (None for a user's saved model without --ckpt, and an LLM)."""
        from nipa.workloads.zoo import checkpoint_path

        if self.ckpt is not None:
            return Path(self.ckpt)
        if self.kind == "cnn":
            return checkpoint_path(self.model_name, self.dataset_id, self.ckpt_dir)
        return None

    def weights_sha256(self) -> str | None:
        """sha256 of the weights, known before anything loads: a CNN's checkpoint; a user model's --ckpt,
        else its saved-model file. None for an LLM (its scripts hash its files once it has loaded)."""
        if self.kind == "llm":
            return None
        path = self.checkpoint()
        if path is None and self.kind == "user":
            path = Path(self.model_name)
        return file_sha256(path) if path is not None and path.is_file() else None

    def describe(self) -> dict[str, Any] | None:
        """What records store about a user's model or data (files, class, sha256s); None for a registry
        CNN on a built-in dataset and for an LLM, whose records stay as they were."""
        if self.kind == "llm" or (self.kind == "cnn" and not self.user_data):
            return None
        entry: dict[str, Any] = {"kind": self.kind, "model": self.model_id, "dataset": self.dataset_id}
        if self.kind == "user":
            from nipa.workloads.usermodel import PYTHON_SPEC

            match = PYTHON_SPEC.match(self.model_name)
            file = Path(match["file"] if match else self.model_name)
            entry.update({"model_file": str(file.resolve()), "class": match["cls"] if match else None,
                          "model_file_sha256": file_sha256(file) if file.is_file() else None,
                          "model_kwargs": self.model_kwargs})
        checkpoint = self.checkpoint()
        entry.update({"checkpoint": None if checkpoint is None else str(checkpoint.resolve()),
                      "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and checkpoint.is_file() else None})
        if self.user_data:
            entry.update({"dataset_path": str(Path(self.dataset).resolve()),
                          "dataset_sha256": user_dataset_sha256(self.dataset),
                          "image": dataclasses.asdict(self.image), "split": self.split,
                          "split_seed": None if self.split is None else self.seed})
        return entry

    # -- data --------------------------------------------------------------------------------------

    def dataset_split(self, split: str):
        """The train or test split as a Dataset (a CNN workload only)."""
        from nipa.workloads.datasets import get_dataset
        from nipa.workloads.userdata import user_dataset_split

        if self.user_data:
            return user_dataset_split(self.dataset, split, options=self.image, fraction=self.split, seed=self.seed)
        return get_dataset(self.dataset, split, data_root=str(self.data_root), augment=False)

    def test_data(self, batch_size: int | None = None, num_workers: int = 0, limit: int | None = None):
        """The evaluation loader (fixed order): the first `limit` test samples."""
        from nipa.workloads.datasets import make_loader

        data = self.dataset_split("test")
        if limit is not None and limit < len(data):
            data = torch.utils.data.Subset(data, range(limit))
        return make_loader(data, batch_size=batch_size or self.default_batch_size, shuffle=False, seed=0,
                           num_workers=num_workers)

    def calibration_inputs(self, data, batches: int, batch_size: int | None = None, seed: int = 0
                           ) -> list[torch.Tensor]:
        """`batches` input batches for ADC calibration: the train split (never the test split); an LLM's
        task items (its only data)."""
        from nipa.workloads.zoo import calibration_inputs

        if self.kind == "llm" or not self.user_data:
            return calibration_inputs(self.model_name, self.dataset, data, batches, data_root=self.data_root,
                                      batch_size=batch_size, seed=seed)
        if batches <= 0:
            return []
        from nipa.workloads.datasets import make_loader

        loader = make_loader(self.dataset_split("train"), batch_size=batch_size or self.default_batch_size,
                             shuffle=True, seed=seed)
        return [x for _, (x, _) in zip(range(batches), loader, strict=False)]

    # -- model -------------------------------------------------------------------------------------

    def load_model(self, device: torch.device | str = "cpu", random_init: bool = False
                   ) -> tuple[nn.Module, dict[str, Any]]:
        """The model in eval mode and its metadata (a user model's: its description)."""
        from nipa.workloads.zoo import load_trained_model

        if self.kind == "llm":
            from nipa.llm.load import load_causal_lm

            return load_causal_lm(self.model_name, device)
        if self.kind == "user":
            model, description = load_user_model(self.model_name, ckpt=self.ckpt, model_kwargs=self.model_kwargs,
                                                 allow_pickle=self.allow_pickle, random_init=random_init)
            check_mappable(model, self.model_name)
            return model.to(device).eval(), description
        if not self.user_data:
            return load_trained_model(self.model_name, self.dataset, self.ckpt_dir, self.ckpt, device)
        # A registry CNN on the user's data: shaped by the train split, weights from its checkpoint.
        import models

        train = self.dataset_split("train")
        sample, _ = train[0]
        model = models.get_model(self.model_name, in_channels=int(sample.shape[0]),
                                 num_classes=int(getattr(train, "num_classes", 0)) or 10)
        checkpoint = self.checkpoint()
        if not random_init:
            if checkpoint is None or not checkpoint.is_file():
                raise UserError(f"no checkpoint for {self.model_name} on {self.dataset} at {checkpoint}; give "
                                "--ckpt weights.pth")
            load_fitting_state_dict(model, checkpoint)  # a plain state dict or a nipa checkpoint
        return model.to(device).eval(), {"checkpoint": str(checkpoint)}

    def load(self, device: torch.device | str = "cpu", batch_size: int | None = None, num_workers: int = 0,
             limit: int | None = None) -> tuple[nn.Module, dict[str, Any], Any]:
        """(model, metadata, test data): the data first (a missing dataset fails fast), then the model,
        then one forward pass on one test sample, so that a model that does not take the data's inputs
        fails before any work."""
        from nipa.workloads.zoo import load_model_and_data

        if self.kind == "llm" or (self.kind == "cnn" and not self.user_data):
            return load_model_and_data(self.model_name, self.dataset, ckpt_dir=self.ckpt_dir, ckpt=self.ckpt,
                                       data_root=self.data_root, batch_size=batch_size, device=device,
                                       num_workers=num_workers, limit=limit)
        data = self.test_data(batch_size, num_workers, limit)
        model, meta = self.load_model("cpu")
        check_inputs(model, data.dataset, self.model_name, self.dataset)
        return model.to(device).eval(), meta, data


def check_mappable(model: nn.Module, name: str) -> None:
    """A model without any layer the crossbars can hold is refused (its 'hardware' accuracy would be the
    float model's)."""
    from nipa.hardware.mapping import digital_layers, is_mappable

    if any(is_mappable(m) for n, m in model.named_modules() if n):
        return
    kept = ", ".join(f"{n} ({k})" for n, k, _ in digital_layers(model, [])[:10])
    raise UserError(f"--model_name {name}: no mappable layer (nn.Linear, or nn.Conv2d with groups=1) in the model; "
                    f"modules with weights: {kept or 'none'}")


def _expected_input(model: nn.Module) -> str:
    from nipa.hardware.mapping import is_mappable

    for name, module in model.named_modules():
        if name and is_mappable(module):
            if isinstance(module, nn.Conv2d):
                return f"its first mapped layer {name} (Conv2d) takes [N, {module.in_channels}, H, W]"
            return f"its first mapped layer {name} (Linear) takes [..., {module.in_features}]"
    return "its expected shape is unknown"


@torch.no_grad()
def check_inputs(model: nn.Module, dataset, model_name: str, dataset_name: str) -> None:
    """One forward pass on one sample: the model must take the data's inputs and give a logit per class."""
    if len(dataset) == 0:
        raise UserError(f"--dataset {dataset_name}: the test split is empty")
    sample, _ = dataset[0]
    inputs = sample.unsqueeze(0)
    try:
        logits = model.eval()(inputs)
    except Exception as exc:  # any shape error of the user's forward
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Guard failed" in first:  # a torch.export program traced for one batch size
            first += ("; export the model with a dynamic batch dimension: torch.export.export(model, (x,), "
                      "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")
        raise UserError(f"--model_name {model_name} does not take the inputs of --dataset {dataset_name}: one "
                        f"sample is {list(inputs.shape)}; {_expected_input(model)} ({type(exc).__name__}: "
                        f"{first[:300]}); resize the data (--input_size) or give the model the data was made "
                        "for") from None
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"--model_name {model_name}: gives {shape} for one sample of {list(inputs.shape)}; a "
                        "classifier must give logits [N, classes]")
    targets = getattr(getattr(dataset, "dataset", dataset), "targets", None)  # through a --limit Subset
    classes = int(max(targets)) + 1 if targets is not None and len(targets) else 0
    if classes > logits.shape[1]:
        raise UserError(f"--model_name {model_name} gives {logits.shape[1]} logits but --dataset {dataset_name} has "
                        f"labels up to {classes - 1}; give the model's number of classes (--model_kwargs)")


# What must agree for records of a user's model or data to join one results file (paths may move).
_IDENTITY_KEYS = ("kind", "class", "model_file_sha256", "model_kwargs", "checkpoint_sha256", "dataset_sha256",
                  "image", "split", "split_seed")


def check_workload(existing: list[dict], description: dict[str, Any] | None, path: str | Path,
                   hint: str = "pass --out for a new results file") -> None:
    """Refuse to add records of one model or dataset to a results file holding another's."""
    wanted = {k: (description or {}).get(k) for k in _IDENTITY_KEYS}
    for number, record in enumerate(existing, 1):
        have = {k: (record.get("workload") or {}).get(k) for k in _IDENTITY_KEYS}
        if have != wanted:
            diff = {k: (have[k], wanted[k]) for k in _IDENTITY_KEYS if have[k] != wanted[k]}
            raise UserError(f"{path}: record {number} is of another model or dataset (field: (in file, now) "
                            f"{diff}); {hint}")
