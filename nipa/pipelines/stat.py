"""stat.py's pipeline: per-layer, per-slice weight bit statistics for every requested (wl_weight,
subArray, cellBit) combination of a model, written to one JSON file (nipa.estimation.stats holds the statistics).

`run_stat(StatSettings(...))` checks the combinations (INI files and explicit values) and the output file
before any work, loads the model (a registry CNN's checkpoint, a user's model, an LLM, or untrained
weights for tests), resolves the mapped layers, computes the statistics, keeps the compatible ones
already in the file, and writes it.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nipa.errors import UserError
from nipa.estimation.stats import (
    ComboStats,
    ModelStats,
    check_combo,
    combo_key,
    combos_of_spaces,
    load_statistics,
    model_statistics,
    parse_combo_key,
    save_statistics,
    weight_matrix,
)
from nipa.hardware.config import ConfigError, SearchSpace
from nipa.hardware.mapping import digital_report, select_layers
from nipa.llm.load import is_llm_name, load_causal_lm, mapping_report
from nipa.workloads.userdata import is_user_dataset
from nipa.workloads.usermodel import is_user_model_name
from nipa.workloads.workload import UserWorkloadOptions, Workload
from nipa.workloads.zoo import (
    CHECKPOINT_DIR,
    build_model,
    checkpoint_path,
    dataset_id,
    layer_selection,
    load_trained_model,
    model_id,
    statistics_path,
    weights_file,
    weights_sha256,
)

DEFAULT_HWDES = "HW_config/Search_space.ini"


@dataclass
class StatSettings(UserWorkloadOptions):
    """What stat.py is asked (its options, by the same names)."""

    model_name: str = "smallcnn"
    dataset: str = "mnist5k"
    ckpt_dir: str = CHECKPOINT_DIR
    ckpt: str | None = None
    random_init: bool = False  # untrained weights seeded by `seed` (tests and benchmarks)
    seed: int = 0
    HWdes: Sequence[str] | None = None  # INI files (default DEFAULT_HWDES unless explicit combinations)
    wl_weight: Sequence[int] | None = None
    subArray: Sequence[int] | None = None
    cellbit: Sequence[int] | None = None
    exclude_layer: Sequence[str] = field(default_factory=list)
    include_layer: Sequence[str] | None = None
    block: int | str | None = None
    count_padding: bool = False
    out: str | None = None  # default results/stats/{model}_{dataset}.json
    overwrite: bool = False
    show: str | None = None  # the combination whose table is logged (default: the first)
    data_root: str = "data"
    # The model and data resolved already; None: from the fields above.
    workload: Workload | None = None


def requested_combos(settings: StatSettings) -> list[tuple[int, int, int]]:
    """Every combination asked for; INI files and values are checked here, before any work."""
    explicit = [settings.wl_weight, settings.subArray, settings.cellbit]
    ini_paths = settings.HWdes
    if ini_paths is None and all(v is None for v in explicit):
        ini_paths = [DEFAULT_HWDES]
    combos: dict[tuple[int, int, int], None] = {}
    if ini_paths:
        spaces = [SearchSpace.from_ini(path) for path in ini_paths]  # ConfigError names file/key/value
        combos.update(dict.fromkeys(combos_of_spaces(spaces)))
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--wl_weight, --subArray and --cellbit go together: give all three")
        for w, s, c in itertools.product(settings.wl_weight, settings.subArray, settings.cellbit):
            try:
                combos[check_combo(w, s, c)] = None
            except ConfigError as exc:
                raise ConfigError(f"--wl_weight {w} --subArray {s} --cellbit {c}: {exc}") from None
    return list(combos)


def load_model(settings: StatSettings) -> tuple[torch.nn.Module, str, str | None]:
    """The model, a description of where its weights came from and their sha256 (nipa.workloads.zoo.weights_sha256;
    None for --random_init)."""
    if is_user_model_name(settings.model_name) or is_user_dataset(settings.dataset):  # the user's model or data
        workload = settings.workload or Workload.from_args(settings)
        torch.manual_seed(settings.seed)  # of --random_init
        model, meta = workload.load_model(random_init=settings.random_init)
        if settings.random_init and workload.ckpt is None:
            return model, f"random_init(seed={settings.seed})", None
        source = meta.get("checkpoint") or meta.get("file") or settings.model_name
        return model, str(source), workload.weights_sha256()
    if is_llm_name(settings.model_name):
        if settings.random_init:
            raise UserError("--random_init is for the project's CNNs; an LLM's weights come from its files")
        model, meta = load_causal_lm(settings.model_name)
        path = weights_file(settings.model_name, settings.dataset, metadata=meta)
        return model, str(path), weights_sha256(path)
    if settings.random_init:
        torch.manual_seed(settings.seed)
        return build_model(settings.model_name, settings.dataset).eval(), f"random_init(seed={settings.seed})", None
    model, meta = load_trained_model(settings.model_name, settings.dataset, settings.ckpt_dir, settings.ckpt)
    path = Path(settings.ckpt) if settings.ckpt else checkpoint_path(settings.model_name, settings.dataset,
                                                                     settings.ckpt_dir)
    return model, str(path), weights_sha256(path)


def weights_digest(model: torch.nn.Module, layers: list[str]) -> str:
    """SHA-1 of the mapped weights: statistics of different weights are never merged."""
    digest = hashlib.sha1()
    modules = dict(model.named_modules())
    for name in layers:
        digest.update(name.encode())
        digest.update(weight_matrix(modules[name]).numpy().tobytes())
    return digest.hexdigest()


def merge_into_existing(path: Path, stats: ModelStats, log) -> ModelStats:
    """Keep combinations already in `path` when they describe the same weights and layers."""
    if not path.is_file():
        return stats
    old = load_statistics(path)  # anything but statistics is refused, never replaced (--overwrite does)
    same = all(old.meta.get(k) == stats.meta.get(k)
               for k in ("weights_sha1", "weights_sha256", "layers", "count_padding", "model", "dataset",
                         "format_version"))
    if not same:
        log(f"note: {path} holds statistics of other weights, another layer selection or an older format; "
            "replacing it")
        return stats
    kept = [k for k in old.combos if k not in stats.combos]
    merged = ModelStats(meta=stats.meta, combos={**{k: old.combos[k] for k in kept}, **stats.combos})
    if kept:
        log(f"kept {len(kept)} combination(s) already in {path}")
    return merged


def format_table(combo: ComboStats) -> str:
    """Per-layer table of one combination, with the model average as the last line."""
    width = max(28, *(len(name) for name in combo.layers))

    def row(name: str, fan_in: str, tiles: str, weight_var: str, var, density) -> str:
        v = " ".join(f"{x:.4f}" for x in var)
        d = " ".join(f"{x:.3f}" for x in density)
        return f"{name:<{width}} {fan_in:>7} {tiles:>4} {weight_var:>10}  {v}  |  {d}"

    k = combo.num_slices
    lines = [f"{combo.key}: wl_weight={combo.wl_weight} subArray={combo.subArray} cellBit={combo.cellBit}, "
             f"K={k} slices (slice 0 least significant); var_k | density_k",
             f"{'layer':<{width}} {'fan_in':>7} {'T':>4} {'sigma_w^2':>10}  var_0..var_{k - 1}  |  "
             f"density_0..density_{k - 1}"]
    for i, name in enumerate(combo.layers):
        lines.append(row(name, str(combo.fan_in[i]), str(combo.tiles[i]), f"{combo.weight_var[i]:.3e}",
                         combo.var[i], combo.density[i]))
    avg = combo.model_average()
    lines.append(row("(model average)", f"{avg['fan_in']:.0f}", f"{avg['tiles']:.1f}",
                     f"{avg['weight_var']:.3e}", avg["var"], avg["density"]))
    return "\n".join(lines)


def run_stat(settings: StatSettings, log: Callable[[str], None] = print) -> ModelStats:
    """stat.py after argument parsing: the statistics of every requested combination, merged into the
    compatible ones already in the output file, written there; returns what was written. `log` receives
    the mapping report, the per-layer table and the progress lines."""
    combos = requested_combos(settings)
    if settings.show is not None and parse_combo_key(settings.show) not in combos:
        raise ConfigError(f"--show {settings.show}: not among the requested combinations "
                          f"({', '.join(combo_key(*c) for c in combos)})")
    out = Path(settings.out or statistics_path(settings.model_name, settings.dataset))
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name, e.g. {out / 'stats.json'}")
    if out.is_file() and not settings.overwrite:
        try:  # a file that is not statistics is refused before any work, never replaced
            load_statistics(out)
        except UserError as exc:
            raise UserError(f"--out {exc}; give another --out, or --overwrite to replace the file") from None
    model, source, weights = load_model(settings)
    include, exclude = layer_selection(settings.model_name, model, settings.include_layer, settings.exclude_layer,
                                       settings.block)
    layers = select_layers(model, exclude, include)  # bad patterns fail here
    if is_llm_name(settings.model_name):
        log(mapping_report(model, layers))
    elif is_user_model_name(settings.model_name):
        log(mapping_report(model, layers))
        log(digital_report(model, layers))
    description = None if is_llm_name(settings.model_name) else (settings.workload or
                                                                  Workload.from_args(settings)).describe()

    start = time.perf_counter()
    stats = model_statistics(
        model, combos, exclude, include, model_name=model_id(settings.model_name),
        dataset=dataset_id(settings.model_name, settings.dataset), count_padding=settings.count_padding,
        metadata={"source": source, "weights_sha1": weights_digest(model, layers), "weights_sha256": weights,
                  **({"workload": description} if description else {})})
    seconds = time.perf_counter() - start
    log(f"{settings.model_name} on {settings.dataset} ({source}): {len(layers)} mapped layers, "
        f"{len(combos)} combinations in {seconds:.2f} s")

    shown = stats.get(*parse_combo_key(settings.show)) if settings.show else next(iter(stats.combos.values()))
    log(format_table(shown))
    if not settings.overwrite:
        stats = merge_into_existing(out, stats, log)
    save_statistics(stats, out)
    log(f"wrote {out} ({len(stats.combos)} combinations: {', '.join(sorted(stats.combos))})")
    return stats
