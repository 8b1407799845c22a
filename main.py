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
import sys
from pathlib import Path

from nipa.cli import add_layer_args, add_model_args, add_runtime_args, parse_shard, resolve_model_args, run_main
from nipa.compat import SWITCHES, Compat
from nipa.config import ADC_MODES, SearchSpace, check_layer_patterns, parse_layer_overrides
from nipa.errors import UserError
from nipa.llm import is_llm_name, mapping_report
from nipa.logs import open_log
from nipa.mapping import digital_report, select_layers
from nipa.records import RecordWriter, check_results_path, read_records, shard_path
from nipa.runtime import default_memory_mb, resolve_device, seed_everything
from nipa.sweep import SweepSettings, check_compatible, run_sweep
from nipa.workload import Workload, check_workload
from nipa.zoo import default_batch_size, layer_selection, weights_file, weights_sha256


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


def sweep_settings(args: argparse.Namespace, exclude, include, weights: str | None,
                   extra: dict | None = None, device: str = "cpu") -> SweepSettings:
    return SweepSettings(
        model_name=args.model_name, dataset=args.dataset, hw_file=args.HWdes, sample_num=args.sample_num,
        cycle=args.cycle, seed=args.seed, batch_size=args.batch_size, limit=args.limit,
        exclude=exclude, include=include, adc_mode=args.adc_mode,
        per_read=args.per_read, calib_batches=args.calib_batches, memory_mb=args.memory_mb,
        shard=args.shard, copy_identical_chips=not args.simulate_identical_chips, weights=weights,
        compat=Compat.parse(args.compat), device=device, extra=extra or {},
        layer_overrides=parse_layer_overrides(args.layer_override) or None)


def run(args: argparse.Namespace) -> int:
    # Every check the inputs allow comes before the model loads: the INI, the options, the device, the
    # results file (and, for a CNN, whether the file's sweep is this one).
    args.batch_size = args.batch_size or default_batch_size(args.model_name)
    Compat.parse(args.compat)  # an unknown name is reported before any work
    space = SearchSpace.from_ini(args.HWdes)  # every bad value is reported before any work starts
    modes = [args.adc_mode] if args.adc_mode else space.choices.get("adc_mode", [])
    calibrated = "calibrated" in modes
    if calibrated and args.calib_batches < 1:
        raise UserError(f"--calib_batches {args.calib_batches}: the calibrated ADC mode "
                        f"({'--adc_mode' if args.adc_mode else args.HWdes}) needs at least one batch to set "
                        "its ranges")
    device = resolve_device(args.device, args.gpu_id)
    if args.memory_mb is None:
        args.memory_mb = default_memory_mb(device)
    workload = Workload.from_args(args)  # the model and data, resolved once (nothing is loaded yet)
    out = Path(args.out) if args.out else workload.results_path("accsim")
    check_results_path(shard_path(out, args.shard))
    existing = read_records(out)  # every shard: a damaged one is reported now, not after the model loads
    description = workload.describe()
    check_workload(existing, description, out)
    weights = workload.weights_sha256()
    if weights is not None:  # a CNN's layer selection is as given
        include = None if args.include_layer is None else list(args.include_layer)
        check_compatible(existing, sweep_settings(args, list(args.exclude_layer), include, weights,
                                                  device=str(device)), out)
    log = open_log(args.log_file)
    size = len(space)
    log(f"{args.HWdes}: a grid of {size} distinct points; "
        + (f"sampling {args.sample_num}" if 0 < args.sample_num < size else "running all of them"))
    seed_everything(args.seed)
    model, meta, test_loader = workload.load(device=device, batch_size=args.batch_size,
                                             num_workers=args.num_workers, limit=args.limit)
    if weights is None:
        weights = weights_sha256(weights_file(args.model_name, args.dataset, args.ckpt_dir, args.ckpt, meta))
    include, exclude = layer_selection(args.model_name, model, args.include_layer, args.exclude_layer, args.block)
    mapped = select_layers(model, exclude=exclude, include=include)
    if args.layer_override:  # a layer pattern that matches no mapped layer fails before any simulation
        check_layer_patterns(list(parse_layer_overrides(args.layer_override)), mapped)
    log(mapping_report(model, mapped))
    if not is_llm_name(args.model_name):
        log(digital_report(model, mapped))
    settings = sweep_settings(args, exclude, include, weights, {"checkpoint_top1": meta.get("test_top1"),
                                                                **({"workload": description} if description else {})},
                              device=str(device))
    check_compatible(existing, settings, out)  # before the calibration data are read
    calib_inputs = workload.calibration_inputs(test_loader, args.calib_batches if calibrated else 0,
                                               batch_size=args.batch_size, seed=args.seed)
    writer = RecordWriter(shard_path(out, args.shard))
    run_sweep(settings, model, test_loader, calib_inputs, device, out, writer, log)
    log(f"records in {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
