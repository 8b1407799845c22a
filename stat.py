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
import dataclasses
import sys

from nipa.cli import (
    add_debug_arg,
    add_layer_args,
    add_text_window_args,
    add_user_data_args,
    add_user_model_args,
    resolve_model_args,
    run_main,
)
from nipa.pipelines.stat import DEFAULT_HWDES, StatSettings, run_stat
from nipa.workloads.datasets import DATASET_NAMES
from nipa.workloads.zoo import CHECKPOINT_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smallcnn",
                        help="a CNN of models.MODEL_NAMES (default smallcnn) or a causal LM (see nipa/llm/load.py)")
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
                              "included (the statistics of nipa 0.1's first release; see nipa/estimation/stats.py)")
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


def main(argv: list[str] | None = None) -> int:
    return run_main("stat.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    run_stat(StatSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StatSettings)
                             if hasattr(args, f.name)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
