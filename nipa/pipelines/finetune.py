"""Non-ideal device fine-tuning of a one-to-one MLC chip, and its baselines (SPEC section 9).

Every method starts from the same trained float model and is evaluated on the same programmed chips
(`nipa.simulator.mlc`, seeded per chip):

| method           | what changes                                                  | data        | chip in loop |
| ---------------- | ------------------------------------------------------------- | ----------- | ------------ |
| none             | nothing                                                       | -           | -            |
| bn_only          | batch-norm running statistics, re-estimated on the chip       | calibration | forward      |
| label_only       | digital parameters, cross-entropy                             | calibration | yes          |
| vat              | float weights trained with injected variation, then programmed | train split | no           |
| vat_bn           | vat, then bn_only (a stronger baseline than the spec asks for) | both        | forward      |
| proposed_digital | digital parameters, CE + KD + layer matching                  | calibration | yes          |
| proposed_cells   | digital parameters and cell targets (re-programmed, writes)   | calibration | yes          |

The proposed loss (our reading of the TCAD 2025 abstract): (1 - alpha) CE(labels) + alpha T^2
KL(teacher || chip at temperature T) + beta * mean over mapped layers of the layer's output mismatch,
where the teacher is the ideal quantized model (the same one-to-one mapping without device error) and
each mapped layer of the chip is compared with the teacher's layer fed with the *chip's own* input to
that layer, the mismatch normalised by the teacher output's variance. The layer term is local: its
gradient reaches that layer's parameters only (earlier layers are steered by CE and KD).

Mode "cells" runs in two phases: for `cell_epochs` the cell targets move (SGD on per-layer normalised
straight-through gradients) and the changed cells are re-programmed every `reprogram_every` steps;
then the targets are frozen and only the digital parameters keep training, so they adapt to the
errors the last writes drew.

Every fine-tuning method (label_only, proposed_*) ends with a batch-norm re-estimation on the
calibration set, so each includes what bn_only does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from nipa.hardware.config import HWConfig
from nipa.hardware.quant import quantize_weight_tiles
from nipa.logs import open_log
from nipa.results.records import (
    FINETUNE_KEY,
    RecordWriter,
    check_results_path,
    done_keys,
    environment,
    read_records,
    timestamp,
)
from nipa.runtime import resolve_device, seed_everything
from nipa.simulator.evaluate import evaluate
from nipa.simulator.mlc import (
    ChipOptions,
    calibrate_adc,
    chip_cells,
    chip_writes,
    convert_mlc,
    mlc_hw,
    mlc_layers,
    program_cells,
    reprogram_chip,
    set_trainable,
)
from nipa.workloads.workload import UserWorkloadOptions, Workload

METHODS = ("none", "bn_only", "label_only", "vat", "vat_bn", "proposed_digital", "proposed_cells")
# What each method may change on the chip (nipa.simulator.mlc.set_trainable modes).
TRAINABLE_MODE = {"none": "none", "bn_only": "none", "label_only": "digital", "vat": "none", "vat_bn": "none",
                  "proposed_digital": "digital", "proposed_cells": "cells"}


@dataclass
class FinetuneSettings:
    """Fine-tuning and baseline hyper-parameters (defaults: the headline run, see README)."""

    calib_samples: int = 512  # train-split images used on the chip
    epochs: int = 20  # passes over the calibration set
    batch_size: int = 64
    lr: float = 1e-3  # Adam, digital parameters
    cell_lr: float = 5e-4  # SGD on per-layer normalised gradients, shadow cell levels (level units)
    kd_temperature: float = 4.0
    kd_weight: float = 0.5  # alpha: KD share of the logit loss
    layer_weight: float = 1.0  # beta: weight of the layer-wise matching term
    reprogram_every: int = 8  # optimizer steps between re-programmings (mode "cells")
    cell_epochs: int = 10  # mode "cells": epochs that move cell targets; the rest tune digital only
    vat_epochs: int = 10  # variation-aware training on the train split
    vat_lr: float = 0.01  # SGD, momentum 0.9, cosine schedule
    vat_batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# data and small helpers
# ---------------------------------------------------------------------------------------------------


def calibration_tensors(train_set, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` images of the train split (a seeded random subset, no augmentation) as tensors."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_set), generator=generator)[:samples].tolist()
    images, labels = zip(*(train_set[i] for i in order), strict=True)
    return torch.stack(images), torch.tensor(labels)


def _set_train(model: nn.Module) -> None:
    """Train mode for batch-norm, with dropout off: a deployed chip is fine-tuned, not regularised."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every batch-norm's running statistics by their exact average over the given batches,
    as computed by the chip (cumulative average: momentum None)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    _set_train(model)
    try:
        for inputs in batches:
            model(inputs)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)


def _batches(images: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    return [images[i:i + batch_size].to(device) for i in range(0, len(images), batch_size)]


# ---------------------------------------------------------------------------------------------------
# the losses
# ---------------------------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term, T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                    reduction="batchmean") * temperature**2


class LayerMatcher:
    """Captures each mapped layer's input on the chip and scores the layer against the teacher's
    layer fed with that same input."""

    def __init__(self, chip: nn.Module, teacher: nn.Module) -> None:
        self.pairs = [(layer, teacher.get_submodule(name)) for name, layer in mlc_layers(chip).items()]
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, (layer, _) in enumerate(self.pairs)]

    def _hook(self, index: int) -> Callable:
        def hook(module, args):
            self.inputs[index] = args[0].detach()
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over layers of MSE(chip layer, teacher layer) / Var(teacher layer), same inputs."""
        terms = []
        for index, (layer, teacher_layer) in enumerate(self.pairs):
            x = self.inputs[index]
            with torch.no_grad():
                target = teacher_layer(x)
            terms.append(F.mse_loss(layer(x), target) / target.var().clamp(min=1e-12))
        return torch.stack(terms).mean()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------------


def finetune_chip(chip: nn.Module, teacher: nn.Module | None, images: torch.Tensor, labels: torch.Tensor,
                  settings: FinetuneSettings, mode: str, use_teacher: bool, seed: int,
                  device: torch.device) -> dict[str, Any]:
    """Fine-tune a programmed chip in place on the calibration set.

    mode: "digital" or "cells" (see nipa.simulator.mlc.set_trainable); use_teacher: the proposed loss
    (CE + KD + layer matching) instead of cross-entropy alone. Returns steps and writes.
    """
    trainable = set_trainable(chip, mode)
    digital = [p for n, p in chip.named_parameters() if p.requires_grad and not n.endswith("shadow")]
    cells = [p for n, p in chip.named_parameters() if p.requires_grad and n.endswith("shadow")]
    optimizer = torch.optim.Adam(digital, lr=settings.lr)
    # Cells: SGD on gradients normalised per layer. Adam would move every cell at the same rate; here
    # a cell moves in proportion to how much (and how consistently) the loss wants it changed, so the
    # cells that cross a rounding boundary, and are written, are the ones that matter.
    cell_optimizer = torch.optim.SGD(cells, lr=settings.cell_lr, momentum=0.9) if cells else None
    matcher = LayerMatcher(chip, teacher) if use_teacher else None
    if teacher is not None:
        teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    _set_train(chip)
    try:
        for epoch in range(settings.epochs):
            if cells and epoch == settings.cell_epochs:
                # The cells are final: write them, then let the digital parameters adapt to what was
                # actually programmed (each write drew a fresh error the targets did not foresee).
                reprogram_chip(chip)
                for shadow in cells:
                    shadow.requires_grad_(False)
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), settings.batch_size):
                index = order[start:start + settings.batch_size]
                x, y = images[index].to(device), labels[index].to(device)
                logits = chip(x)
                loss = F.cross_entropy(logits, y)
                if matcher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    alpha = settings.kd_weight
                    loss = ((1 - alpha) * loss + alpha * kd_loss(logits, teacher_logits, settings.kd_temperature)
                            + settings.layer_weight * matcher.loss())
                optimizer.zero_grad(set_to_none=True)
                if cell_optimizer is not None:
                    cell_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if cell_optimizer is not None and cells[0].requires_grad:
                    with torch.no_grad():
                        for shadow in (s for s in cells if s.grad is not None):
                            shadow.grad /= shadow.grad.pow(2).mean().sqrt().clamp(min=1e-12)
                    cell_optimizer.step()
                steps += 1
                if cells and cells[0].requires_grad and steps % settings.reprogram_every == 0:
                    reprogram_chip(chip)
        if cells and cells[0].requires_grad:
            reprogram_chip(chip)  # cell_epochs >= epochs: the final targets go on the chip
    finally:
        if matcher is not None:
            matcher.close()
        set_trainable(chip, "none")
    reestimate_bn(chip, _batches(images, settings.batch_size, device))
    return {"steps": steps, "writes": chip_writes(chip), "trainable": trainable}


def noisy_weight(weight: torch.Tensor, hw: HWConfig, generator: torch.Generator) -> torch.Tensor:
    """One programming draw of a float weight as the one-to-one chip would hold it (per-channel
    quantization, the shared cell model), with a straight-through gradient to the float weight."""
    matrix = weight.detach().reshape(weight.shape[0], 1, -1).float()
    q, scale = quantize_weight_tiles(matrix, hw.wl_weight)
    # Drawn where the weight is (the generator must be on its device): no host round trip per step.
    g_pos, g_neg = program_cells(q[:, 0], hw, generator)
    programmed = (scale * (g_pos - g_neg)).reshape(weight.shape).to(weight.dtype)
    return weight + (programmed - weight).detach()


def train_vat(model: nn.Module, hw: HWConfig, layers: Sequence[str], loader: DataLoader,
              settings: FinetuneSettings, seed: int, device: torch.device,
              log: Callable[[str], None] = print) -> nn.Module:
    """Variation-aware training: continue training the float model with a fresh draw of the chip's
    quantization and programming error in every mapped layer at every step; no chip in the loop."""
    model = copy.deepcopy(model).to(device)
    # A noise stream no chip uses, on the training device: the same numbers as before on a CPU, a
    # stream of its own on a GPU (VAT's draws are training noise, not a chip).
    generator = torch.Generator(device=device).manual_seed(seed + 104_729)
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.vat_lr, momentum=0.9, weight_decay=5e-4)
    total = settings.vat_epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for epoch in range(settings.vat_epochs):
        model.train()
        loss_sum, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            params = dict(model.named_parameters())
            weights = {f"{name}.weight": noisy_weight(params[f"{name}.weight"], hw, generator) for name in layers}
            loss = F.cross_entropy(functional_call(model, weights, (x,)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum, count = loss_sum + float(loss.detach()) * len(y), count + len(y)
        log(f"  vat epoch {epoch + 1}/{settings.vat_epochs}  loss {loss_sum / max(count, 1):.4f}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# the experiment: every method on every chip, for every spread
# ---------------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """Everything fixed across one finetune.py run."""

    model_name: str
    dataset: str
    cell_bits: int
    vari_type: str
    spreads: Sequence[float]
    chips: int
    methods: Sequence[str]
    settings: FinetuneSettings
    options: ChipOptions = dataclasses.field(default_factory=ChipOptions)
    SAF_prop: float = 0.0
    onoffratio: float = 1e8
    exclude: Sequence[str] = ()
    include: Sequence[str] | None = None
    seed: int = 0

    def run_key(self, hw: HWConfig) -> str:
        """Identifies the records of one (hardware point, settings) so a rerun skips them."""
        return json.dumps({"hw": hw.key(), "settings": self.settings.to_dict(),
                           "options": dataclasses.asdict(self.options), "exclude": list(self.exclude),
                           "include": None if self.include is None else list(self.include),
                           "seed": self.seed}, sort_keys=True)


def run_experiment(exp: Experiment, model: nn.Module, test_loader: DataLoader, train_set,
                   device: torch.device, write: Callable[[dict], None],
                   done: set[tuple[str, str, int]] = frozenset(), log: Callable[[str], None] = print,
                   extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every method on every chip for every spread, calling `write(record)` as each finishes.
    `done` holds (run_key, method, chip) triples already recorded; they are skipped."""
    for method in exp.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected some of {', '.join(METHODS)}")
    model = model.to(device).eval()
    images, labels = calibration_tensors(train_set, exp.settings.calib_samples, exp.seed)
    calib_batches = _batches(images, exp.settings.batch_size, device)
    ideal_hw = mlc_hw(exp.cell_bits, onoffratio=exp.onoffratio)
    acc_float = evaluate(model, test_loader, device)["top1"]
    teacher = convert_mlc(model, ideal_hw, exclude=exp.exclude, include=exp.include, options=exp.options)
    _calibrate(teacher, calib_batches, exp.options)
    acc_ideal = evaluate(teacher, test_loader, device)["top1"]
    layers = list(mlc_layers(teacher))
    log(f"float top-1 {acc_float:.2f}%, ideal {exp.cell_bits}-bit-cell one-to-one chip {acc_ideal:.2f}%, "
        f"{len(layers)} mapped layers, {chip_cells(teacher)} cells, {len(images)} calibration images")
    records = []
    for spread in exp.spreads:
        hw = mlc_hw(exp.cell_bits, exp.vari_type, spread, exp.SAF_prop, exp.onoffratio)
        key = exp.run_key(hw)
        vat_model, vat_seconds = None, 0.0
        for chip_index in range(exp.chips):
            acc_chip = None
            for method in exp.methods:
                if (key, method, chip_index) in done:
                    continue
                if method.startswith("vat") and vat_model is None:
                    log(f"{hw.describe()}: variation-aware training ({exp.settings.vat_epochs} epochs)")
                    started = time.perf_counter()
                    loader = DataLoader(train_set, batch_size=exp.settings.vat_batch_size, shuffle=True,
                                        generator=torch.Generator().manual_seed(exp.seed))
                    vat_model = train_vat(model, hw, layers, loader, exp.settings, exp.seed, device, log)
                    vat_seconds = time.perf_counter() - started
                if acc_chip is None:  # every record carries its chip's untuned accuracy
                    base = convert_mlc(model, hw, exclude=exp.exclude, include=exp.include,
                                       options=exp.options, seed=exp.seed, chip=chip_index)
                    _calibrate(base, calib_batches, exp.options)
                    acc_chip = evaluate(base, test_loader, device)["top1"]
                record = _run_method(method, exp, hw, chip_index, model, vat_model, teacher, images, labels,
                                     calib_batches, test_loader, device)
                if method.startswith("vat"):
                    record["train_seconds"] += vat_seconds  # one training serves every chip
                    record["vat_seconds"] = vat_seconds
                    record["calib_samples"] = len(train_set)
                loss = acc_ideal - acc_chip
                record.update({
                    "kind": "finetune", "model": exp.model_name.lower(), "dataset": exp.dataset,
                    "hw": hw.to_dict(), "hw_key": hw.key(), "run_key": key, "vari_type": exp.vari_type,
                    "spread": spread, "cell_bits": exp.cell_bits, "chip": chip_index, "seed": exp.seed,
                    "acc_float": acc_float, "acc_ideal": acc_ideal, "acc_chip": acc_chip,
                    "recovery": (record["top1"] - acc_chip) / loss if loss > 0 else float("nan"),
                    "cells": chip_cells(teacher), "mapped_layers": layers,
                    "settings": exp.settings.to_dict(), "options": dataclasses.asdict(exp.options),
                    "samples": len(test_loader.dataset), **(extra or {})})
                write(record)
                records.append(record)
                log(f"{hw.describe()} chip {chip_index} {method:16s} top-1 {record['top1']:6.2f}% "
                    f"(chip {acc_chip:.2f}, ideal {acc_ideal:.2f}, recovery {record['recovery']:+.2f}) "
                    f"writes {record['writes']}  {record['seconds']:.1f}s")
    return records


def _calibrate(chip: nn.Module, batches: list[torch.Tensor], options: ChipOptions) -> None:
    if options.adc_bits is not None:
        calibrate_adc(chip, batches)


def _run_method(method: str, exp: Experiment, hw: HWConfig, chip_index: int, model: nn.Module,
                vat_model: nn.Module | None, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                calib_batches: list[torch.Tensor], test_loader: DataLoader,
                device: torch.device) -> dict[str, Any]:
    """Program chip `chip_index` with the method's model, apply the method, evaluate."""
    started = time.perf_counter()
    source = vat_model if method.startswith("vat") else model
    chip = convert_mlc(source, hw, exclude=exp.exclude, include=exp.include, options=exp.options,
                       seed=exp.seed, chip=chip_index)
    _calibrate(chip, calib_batches, exp.options)
    info: dict[str, Any] = {"steps": 0, "writes": 0, "trainable": []}
    calib_samples = 0
    if method in ("bn_only", "vat_bn"):
        reestimate_bn(chip, calib_batches)
        calib_samples = len(images)
    elif method in ("label_only", "proposed_digital", "proposed_cells"):
        info = finetune_chip(chip, teacher, images, labels, exp.settings, TRAINABLE_MODE[method],
                             use_teacher=method.startswith("proposed"), seed=exp.seed + chip_index,
                             device=device)
        calib_samples = len(images)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(chip, test_loader, device)
    return {"method": method, "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            "writes": info["writes"], "steps": info["steps"], "trainable": info["trainable"],
            "calib_samples": calib_samples, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------
# summary and plot
# ---------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["vari_type", "spread", "method", "chips", "acc_mean", "acc_std", "acc_chip", "acc_ideal",
                   "recovery", "recovery_chip_mean", "recovery_chip_std", "writes", "writes_pct",
                   "calib_samples", "train_s", "wall_s"]


def summarize(records: Sequence[dict[str, Any]]):
    """One row per (variation, method): accuracy mean and std over chips, recovery of the mean
    accuracy (acc - chip) / (ideal - chip), the per-chip recoveries' mean and std, writes, data, time.
    Returns a pandas DataFrame."""
    import pandas as pd

    frame = pd.DataFrame([r for r in records if r.get("kind") == "finetune"])
    if frame.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    order = {m: i for i, m in enumerate(METHODS)}
    rows = []
    for (vari_type, spread, method), group in frame.groupby(["vari_type", "spread", "method"], sort=False):
        acc_chip, acc_ideal = group["acc_chip"].mean(), group["acc_ideal"].mean()
        loss = acc_ideal - acc_chip
        rows.append({
            "vari_type": vari_type, "spread": spread, "method": method, "chips": len(group),
            "acc_mean": group["top1"].mean(), "acc_std": group["top1"].std(ddof=1) if len(group) > 1 else 0.0,
            "acc_chip": acc_chip, "acc_ideal": acc_ideal,
            "recovery": (group["top1"].mean() - acc_chip) / loss if loss > 0 else float("nan"),
            "recovery_chip_mean": group["recovery"].mean(),
            "recovery_chip_std": group["recovery"].std(ddof=1) if len(group) > 1 else 0.0,
            "writes": group["writes"].mean(), "writes_pct": 100 * (group["writes"] / group["cells"]).mean(),
            "calib_samples": int(group["calib_samples"].max()), "train_s": group["train_seconds"].mean(),
            "wall_s": group["seconds"].mean(), "_order": order.get(method, len(order))})
    table = pd.DataFrame(rows).sort_values(["vari_type", "spread", "_order"]).drop(columns="_order")
    return table.reset_index(drop=True)[SUMMARY_COLUMNS]


def format_table(table) -> str:
    """The summary as a fixed-width text table (what finetune.py prints)."""
    lines = [f"{'variation':>22} {'method':16} {'chips':>5} {'top-1 %':>14} {'recovery':>9} "
             f"{'per-chip rec.':>14} {'writes (% cells)':>17} {'calib':>6} {'train s':>8} {'wall s':>7}"]
    for row in table.itertuples(index=False):
        lines.append(
            f"{row.vari_type + ' ' + format(row.spread, 'g'):>22} {row.method:16} {row.chips:5d} "
            f"{row.acc_mean:6.2f} ± {row.acc_std:5.2f} {100 * row.recovery:8.1f}% "
            f"{100 * row.recovery_chip_mean:5.1f} ± {100 * row.recovery_chip_std:5.1f}% "
            f"{row.writes:7.0f} ({row.writes_pct:5.2f}%) {row.calib_samples:6d} {row.train_s:8.1f} {row.wall_s:7.1f}")
    return "\n".join(lines)


def plot_accuracy(table, path, title: str = "") -> None:
    """Accuracy (mean ± std over chips) against the variation spread, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = [m for m in METHODS if m in set(table["method"])]
    spreads = sorted(set(table["spread"]))
    # Methods often overlap: shift each a little sideways and give it its own marker.
    dodge = 0.012 * ((spreads[-1] - spreads[0]) or 1.0)
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].sort_values("spread")
        ax.errorbar(rows["spread"] + (i - (len(methods) - 1) / 2) * dodge, rows["acc_mean"], yerr=rows["acc_std"],
                    marker="os^vDPX*"[i % 8], markersize=5, capsize=3, label=method)
    ideal = table["acc_ideal"].mean()
    ax.axhline(ideal, color="gray", linestyle="--", linewidth=1, label=f"ideal quantized ({ideal:.1f}%)")
    vari_types = sorted(set(table["vari_type"]))
    ax.set_xlabel(f"device variation ({', '.join(vari_types)})")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# finetune.py's job: the workload, the experiment, its records, summary table and plot
# ---------------------------------------------------------------------------------------------------


@dataclass
class FinetuneJobSettings(UserWorkloadOptions):
    """What finetune.py is asked (its options, by the same names; nipa.workloads.workload.Workload.from_args reads
    the model and data ones). `finetune` holds the methods' hyper-parameters (its --ft_* options)."""

    model_name: str = "smallcnn"
    dataset: str = "mnist5k"
    cellbit: int = 3  # bits per cell; weights get cellbit + 1 bits
    vari_type: str = "state_dependent"
    vari: Sequence[float] = (0.6,)  # spreads of vari_type; several sweep
    SAF_prop: float = 0.0
    onoffratio: float = 1e8
    chips: int = 5
    input_bits: int | None = None
    read_noise: float = 0.0
    adc_bits: int | None = None
    adc_rows: int = 128
    methods: Sequence[str] = METHODS
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)
    out: str | None = None  # default results/{model}/{dataset}_finetune.jsonl
    log_file: str | None = None
    exclude_layer: Sequence[str] = ()
    include_layer: Sequence[str] | None = None
    batch_size: int | None = None  # of the test set
    limit: int | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    gpu_id: int | None = None
    data_root: str = "data"
    ckpt_dir: str = "ckpts"
    ckpt: str | None = None


@dataclass
class FinetuneJobResult:
    """What a finetune.py run wrote: its records file, the records new in this run, the summary of this
    run's settings (a pandas DataFrame) and where its CSV and plot went."""

    records_path: Path
    new_records: list[dict[str, Any]]
    table: Any
    csv_path: Path
    plot_path: Path


def run_finetune_job(job: FinetuneJobSettings, log: Callable[[str], None] | None = None) -> FinetuneJobResult:
    """finetune.py after argument parsing: every method on every chip of every spread (resumable
    records), then the summary CSV and plot. `log` receives the progress lines and the table; None:
    printed and appended to `job.log_file` (opened once the results file has been checked)."""
    device = resolve_device(job.device, job.gpu_id)
    workload = Workload.from_args(job)  # the model and data, resolved once
    out = Path(job.out) if job.out else workload.results_path("finetune")
    check_results_path(out)  # before the model loads: a file that is not records is refused, never touched
    previous = [r for r in read_records(out) if r.get("kind") == "finetune"] if out.is_file() else []
    seed_everything(job.seed)
    log = log or open_log(job.log_file)
    model, meta, test_loader = workload.load(device=device, batch_size=job.batch_size,
                                             num_workers=job.num_workers, limit=job.limit)
    train_set = workload.dataset_split("train")  # calibration and fine-tuning data: never the test split
    settings = dataclasses.replace(job.finetune)  # a copy: the calibration size may shrink to the train split
    if settings.calib_samples > len(train_set):
        log(f"--calib_samples {settings.calib_samples} > {len(train_set)} train images: using all of them")
        settings.calib_samples = len(train_set)
    options = ChipOptions(input_bits=job.input_bits, read_noise=job.read_noise, adc_bits=job.adc_bits,
                          adc_rows=job.adc_rows)
    exp = Experiment(model_name=job.model_name, dataset=job.dataset, cell_bits=job.cellbit,
                     vari_type=job.vari_type, spreads=job.vari, chips=job.chips, methods=job.methods,
                     settings=settings, options=options, SAF_prop=job.SAF_prop, onoffratio=job.onoffratio,
                     exclude=job.exclude_layer, include=job.include_layer, seed=job.seed)
    done = done_keys(previous, FINETUNE_KEY)
    writer = RecordWriter(out)
    description = workload.describe()
    extra = {"checkpoint_top1": meta.get("test_top1"), **({"workload": description} if description else {}),
             "device": str(device), "timestamp": timestamp(),
             **environment()}
    started = time.perf_counter()
    records = run_experiment(exp, model, test_loader, train_set, device, writer.append, done, log, extra)
    log(f"{len(records)} new records in {writer.path} ({time.perf_counter() - started:.0f} s)")

    # The summary covers this run's settings: the new records and the finished ones they resumed.
    keys = {exp.run_key(mlc_hw(job.cellbit, job.vari_type, s, job.SAF_prop, job.onoffratio))
            for s in job.vari}
    mine = [r for r in previous + records if r["run_key"] in keys and r["method"] in job.methods
            and r["chip"] < job.chips]
    table = summarize(mine)
    log(format_table(table))
    table.to_csv(out.with_suffix(".csv"), index=False)
    plot = out.with_suffix(".png")
    plot_accuracy(table, plot, title=f"{job.model_name} on {job.dataset}, {job.cellbit}-bit cells, "
                                     f"one-to-one, {job.chips} chips")
    log(f"summary {out.with_suffix('.csv')}, plot {plot}")
    return FinetuneJobResult(writer.path, records, table, out.with_suffix(".csv"), plot)
