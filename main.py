"""Ground truth: bit-and-crossbar slicing simulation of every hardware point of a search space.

    python main.py --model_name smallcnn --dataset mnist5k --HWdes HW_config/Search_space.ini \
        --sample_num 200 --cycle 3 --batch_size 256 --log_file results/smallcnn/mnist5k_accsim.log

    python main.py --model_name ~/models/opt-125m --dataset piqa_valid.jsonl --HWdes HW_config/Search_space.ini \
        --block 1 --cycle 3          # a language model: one decoder block mapped (README, Language models)

Records (one JSON line per chip) go to results/{model}/{dataset}_accsim.jsonl (--out); an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nipa.cli import add_layer_args, add_model_args, add_runtime_args, parse_shard, resolve_model_args, run_main
from nipa.hardware.compat import SWITCHES
from nipa.hardware.config import ADC_MODES, parse_layer_overrides
from nipa.pipelines.sweep import MainSettings, run_sweep_job
from nipa.simulator.evaluate import TEST_ORDERS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--HWdes", default="HW_config/Search_space.ini", help="search-space INI file")
    parser.add_argument("--sample_num", type=int, default=200,
                        help="distinct hardware points drawn from the grid (0 = the full grid)")
    parser.add_argument("--cycle", type=int, default=3, help="chips (device-error draws) per point")
    parser.add_argument("--adc_mode", choices=ADC_MODES, default=None,
                        help="ADC range mode for every point (default: the INI's ADCmode, else dynamic)")
    parser.add_argument("--per_read", action="store_true",
                        help="redraw device error on every read, as the original did (default: once per chip)")
    parser.add_argument("--compat", default=None, metavar="NAMES",
                        help="reproduce the original tool's choices: 'original' (its ground truth), or switches "
                             f"among {', '.join(SWITCHES)} (comma-separated; README, What each fix changes)")
    parser.add_argument("--simulate_identical_chips", action="store_true",
                        help="simulate every chip of a point without device error (default: chips after the "
                             "first, which cannot differ, are recorded as copies of chip 0, marked so)")
    parser.add_argument("--test_order", choices=TEST_ORDERS, default="fixed",
                        help="fixed: every chip reads the test set in its order; per_chip: chip c > 0 in its own "
                             "order, so a dynamic ADC range (one batch's) meets other batches and the chips' "
                             "spread holds the batch composition (README, main.py: the ground-truth sweep)")
    parser.add_argument("--calib_batches", type=int, default=4, help="batches that calibrate the ADC range")
    parser.add_argument("--memory_mb", type=float, default=None,
                        help="memory budget of one crossbar product (default: 256 on a CPU, a quarter of the "
                             "free memory on a GPU)")
    parser.add_argument("--layer_override", action="append", default=[], metavar="LAYER:FIELD=VALUE,...",
                        help="give mapped layers (a name or fnmatch pattern) their own wl_weight, wl_input, subArray, "
                             "ADCprecision or cellBit in every point, e.g. fc2:ADCprecision=7; repeatable")
    parser.add_argument("--shard", type=parse_shard, default=None, help="i/n: run every n-th point from i")
    parser.add_argument("--log_file", default=None, help="readable progress lines are appended here")
    parser.add_argument("--out", default=None, help="results JSONL (default results/{model}/{dataset}_accsim.jsonl)")
    add_layer_args(parser)
    add_runtime_args(parser)
    args = resolve_model_args(parser, parser.parse_args(argv))
    if args.cycle < 1:
        parser.error(f"--cycle {args.cycle}: need at least one chip")
    if args.sample_num < 0:
        parser.error(f"--sample_num {args.sample_num}: give a number of points, or 0 for the full grid")
    if args.calib_batches < 0:
        parser.error(f"--calib_batches {args.calib_batches}: cannot be negative")
    parse_layer_overrides(args.layer_override)  # a malformed --layer_override fails here
    if args.memory_mb is not None and not args.memory_mb > 0:
        parser.error(f"--memory_mb {args.memory_mb}: must be positive (megabytes of one crossbar product)")
    return args


def main(argv=None) -> int:
    return run_main("main.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    run_sweep_job(MainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MainSettings)
                                  if hasattr(args, f.name)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
