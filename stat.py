"""Per-layer, per-slice weight bit statistics for every (wl_weight, subArray, cellBit) combination.

    python stat.py --model_name smallcnn --dataset mnist5k
    python stat.py --model_name resnet18 --dataset cifar10 \
        --HWdes HW_config/Search_space.ini HW_config/Search_space_mlc.ini
    python stat.py --model_name resnet18 --dataset cifar10 --wl_weight 8 --subArray 256 --cellbit 1

Combinations: the union of the grids of the --HWdes files and of the cross product of --wl_weight x
--subArray x --cellbit; with neither, HW_config/Search_space.ini. The statistics go to one JSON file
per model (default results/stats/{model}_{dataset}.json); statistics already in that file for the same
weights and layer selection are kept and the new combinations added. validate.py reads this file.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import time
from pathlib import Path

import torch

from nipa.cli import (
    add_debug_arg,
    add_layer_args,
    add_text_window_args,
    add_user_data_args,
    add_user_model_args,
    resolve_model_args,
    run_main,
)
from nipa.config import ConfigError, SearchSpace
from nipa.data import DATASET_NAMES
from nipa.errors import UserError
from nipa.llm import is_llm_name, load_causal_lm, mapping_report
from nipa.mapping import digital_report, select_layers
from nipa.stats import (
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
from nipa.userdata import is_user_dataset
from nipa.usermodel import is_user_model_name
from nipa.workload import Workload
from nipa.zoo import (
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smallcnn",
                        help="a CNN of models.MODEL_NAMES (default smallcnn) or a causal LM (see nipa/llm.py)")
    parser.add_argument("--dataset", default="mnist5k",
                        help=f"CNN: one of {', '.join(DATASET_NAMES)}; LLM: the task the records use (it names "
                             "the statistics file; the statistics depend on the weights only)")
    parser.add_argument("--tasks", default=None, help="LLM: lm-eval task names (sets --dataset)")
    parser.add_argument("--ckpt_dir", default=CHECKPOINT_DIR)
    parser.add_argument("--ckpt", default=None, help="checkpoint path (default: ckpts/{model}_{dataset}.pt)")
    parser.add_argument("--random_init", action="store_true",
                        help="use untrained weights (seeded by --seed): for tests and benchmarks only")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random_init")
    parser.add_argument("--HWdes", nargs="+", default=None, metavar="INI",
                        help="search-space INI file(s) whose combinations to compute "
                             f"(default {DEFAULT_HWDES} unless --wl_weight/--subArray/--cellbit are given)")
    parser.add_argument("--wl_weight", type=int, nargs="+", default=None, help="weight bits (with sign)")
    parser.add_argument("--subArray", type=int, nargs="+", default=None, help="crossbar rows")
    parser.add_argument("--cellbit", type=int, nargs="+", default=None, help="bits per cell")
    add_layer_args(parser)
    padding = parser.add_mutually_exclusive_group()
    padding.add_argument("--count_padding", action="store_true",
                         help="average each tile row over all subArray rows, the zero padding of a short tile "
                              "included (the statistics of nipa 0.1's first release; see nipa/stats.py)")
    padding.add_argument("--exclude_padding", action="store_true",
                         help="average each tile row over its real rows only (the default; kept for scripts)")
    parser.add_argument("--out", default=None,
                        help="output JSON (default results/stats/{model}_{dataset}.json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output file instead of adding to compatible statistics in it")
    parser.add_argument("--show", default=None, metavar="KEY",
                        help="combination whose per-layer table is printed, e.g. w8_s128_c1 "
                             "(default: the first)")
    add_text_window_args(parser)  # an LLM text's windows name its statistics as they name its records
    add_user_model_args(parser)
    add_user_data_args(parser)
    add_debug_arg(parser)
    return resolve_model_args(parser, parser.parse_args(argv))


def requested_combos(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """Every combination asked for; INI files and values are checked here, before any work."""
    explicit = [args.wl_weight, args.subArray, args.cellbit]
    ini_paths = args.HWdes
    if ini_paths is None and all(v is None for v in explicit):
        ini_paths = [DEFAULT_HWDES]
    combos: dict[tuple[int, int, int], None] = {}
    if ini_paths:
        spaces = [SearchSpace.from_ini(path) for path in ini_paths]  # ConfigError names file/key/value
        combos.update(dict.fromkeys(combos_of_spaces(spaces)))
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--wl_weight, --subArray and --cellbit go together: give all three")
        for w, s, c in itertools.product(args.wl_weight, args.subArray, args.cellbit):
            try:
                combos[check_combo(w, s, c)] = None
            except ConfigError as exc:
                raise ConfigError(f"--wl_weight {w} --subArray {s} --cellbit {c}: {exc}") from None
    return list(combos)


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, str | None]:
    """The model, a description of where its weights came from and their sha256 (nipa.zoo.weights_sha256;
    None for --random_init)."""
    if is_user_model_name(args.model_name) or is_user_dataset(args.dataset):  # the user's model or data
        workload = Workload.from_args(args)
        torch.manual_seed(args.seed)  # of --random_init
        model, meta = workload.load_model(random_init=args.random_init)
        if args.random_init and workload.ckpt is None:
            return model, f"random_init(seed={args.seed})", None
        source = meta.get("checkpoint") or meta.get("file") or args.model_name
        return model, str(source), workload.weights_sha256()
    if is_llm_name(args.model_name):
        if args.random_init:
            raise UserError("--random_init is for the project's CNNs; an LLM's weights come from its files")
        model, meta = load_causal_lm(args.model_name)
        path = weights_file(args.model_name, args.dataset, metadata=meta)
        return model, str(path), weights_sha256(path)
    if args.random_init:
        torch.manual_seed(args.seed)
        return build_model(args.model_name, args.dataset).eval(), f"random_init(seed={args.seed})", None
    model, meta = load_trained_model(args.model_name, args.dataset, args.ckpt_dir, args.ckpt)
    path = Path(args.ckpt) if args.ckpt else checkpoint_path(args.model_name, args.dataset, args.ckpt_dir)
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


def main(argv: list[str] | None = None) -> int:
    return run_main("stat.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    log = print
    combos = requested_combos(args)
    if args.show is not None and parse_combo_key(args.show) not in combos:
        raise ConfigError(f"--show {args.show}: not among the requested combinations "
                          f"({', '.join(combo_key(*c) for c in combos)})")
    out = Path(args.out or statistics_path(args.model_name, args.dataset))
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name, e.g. {out / 'stats.json'}")
    if out.is_file() and not args.overwrite:
        try:  # a file that is not statistics is refused before any work, never replaced
            load_statistics(out)
        except UserError as exc:
            raise UserError(f"--out {exc}; give another --out, or --overwrite to replace the file") from None
    model, source, weights = load_model(args)
    include, exclude = layer_selection(args.model_name, model, args.include_layer, args.exclude_layer,
                                       args.block)
    layers = select_layers(model, exclude, include)  # bad patterns fail here
    if is_llm_name(args.model_name):
        log(mapping_report(model, layers))
    elif is_user_model_name(args.model_name):
        log(mapping_report(model, layers))
        log(digital_report(model, layers))
    description = None if is_llm_name(args.model_name) else Workload.from_args(args).describe()

    start = time.perf_counter()
    stats = model_statistics(
        model, combos, exclude, include, model_name=model_id(args.model_name),
        dataset=dataset_id(args.model_name, args.dataset), count_padding=args.count_padding,
        metadata={"source": source, "weights_sha1": weights_digest(model, layers), "weights_sha256": weights,
                  **({"workload": description} if description else {})})
    seconds = time.perf_counter() - start
    log(f"{args.model_name} on {args.dataset} ({source}): {len(layers)} mapped layers, "
        f"{len(combos)} combinations in {seconds:.2f} s")

    shown = stats.get(*parse_combo_key(args.show)) if args.show else next(iter(stats.combos.values()))
    log(format_table(shown))
    if not args.overwrite:
        stats = merge_into_existing(out, stats, log)
    save_statistics(stats, out)
    log(f"wrote {out} ({len(stats.combos)} combinations: {', '.join(sorted(stats.combos))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
