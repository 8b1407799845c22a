"""Design-space exploration: NIPA and hardware cost (area, energy, latency) of every point of a space, their
Pareto fronts, and optionally a verification against the slicing ground truth.

    python explore.py --model_name smallcnn --dataset mnist5k --HWdes HW_config/Explore_space.ini
    python explore.py --model_name smallcnn --dataset mnist5k --max_area 2 --max_latency 50
    python explore.py --model_name smallcnn --dataset mnist5k --verify 60 --cycle 3

Writes results/{model}/{dataset}_explore.csv (every point: parameters, NIPA, area, energy, latency,
budget and front flags) and {dataset}_explore.png (NIPA against each cost with the fronts). --verify N
simulates N points (the fronts first, then a sample stratified over the NIPA range; --verify_sample random:
a uniform sample of the whole space) into
{dataset}_explore_accsim.jsonl (resumable), runs wrap_error's fast estimate on them, and writes
{dataset}_explore_summary.json (Kendall tau, mean absolute error, regret) and {dataset}_explore_verify.png.
"""

from __future__ import annotations

import argparse
import sys

from nipa.cli import (
    add_layer_args,
    add_model_args,
    add_per_layer_search_args,
    add_runtime_args,
    add_verify_args,
    resolve_model_args,
    resolve_per_layer_search_args,
    run_main,
)
from nipa.errors import UserError
from nipa.estimation.metric import DEVICE_MODELS, INPUT_TERMS, REDUCTIONS, TILE_FACTORS
from nipa.llm.load import is_llm_name
from nipa.logs import open_log
from nipa.pipelines.explore import ExploreSettings, MetricOptions, VerifySettings, outcome_lines, run_explore
from nipa.pipelines.layer_search import PerLayerSettings, SearchOptions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--HWdes", default="HW_config/Explore_space.ini", help="exploration-space INI file")
    parser.add_argument("--max_area", type=float, default=None, help="area budget (mm^2)")
    parser.add_argument("--max_energy", type=float, default=None, help="energy budget per inference (nJ)")
    parser.add_argument("--max_latency", type=float, default=None, help="latency budget per inference (us)")
    parser.add_argument("--reduction", choices=REDUCTIONS, default="model_average", help="NIPA over layers")
    parser.add_argument("--tile_factor", choices=TILE_FACTORS, default="tiles", help="k_T of NIPA's ADC term")
    parser.add_argument("--device_model", choices=DEVICE_MODELS, default="published", help="NIPA's device term")
    parser.add_argument("--input_term", choices=INPUT_TERMS, default="rounding",
                        help="NIPA's input term: rounding (default here: the input bits' rounding noise, "
                             "nipa.estimation.metric.input_rounding_share) or none (the published metric)")
    parser.add_argument("--tokens", type=int, default=1,
                        help="language models: tokens per inference for the cost (default 1: cost per token)")
    parser.add_argument("--random_init", action="store_true", help="untrained weights (tests and benchmarks)")
    parser.add_argument("--out_dir", default=None, help="output folder (default results/{model})")
    parser.add_argument("--log_file", default=None, help="readable progress lines are appended here")
    add_verify_args(parser)
    add_per_layer_search_args(parser)
    add_layer_args(parser)
    add_runtime_args(parser)
    args = resolve_per_layer_search_args(parser, resolve_model_args(parser, parser.parse_args(argv)))
    for name in ("max_area", "max_energy", "max_latency", "target_se", "fast_target_se"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name} {value}: must be positive")
    if args.verify < 0 or args.cycle < 1 or args.max_cycle < args.cycle or args.fast_draws < 1 or args.tokens < 1:
        parser.error("need --verify >= 0, --cycle >= 1, --max_cycle >= --cycle, --fast_draws >= 1, --tokens >= 1")
    if args.verify and args.random_init:
        parser.error("--verify simulates a trained model: leave out --random_init")
    return args


def settings_from_args(args: argparse.Namespace) -> ExploreSettings:
    verify = None
    # --per_layer simulates its points on a trained model with the verification's chip settings
    if args.verify or (args.per_layer and not args.random_init):
        test_order = args.test_order or ("fixed" if is_llm_name(args.model_name) else "per_chip")
        if test_order != "fixed" and is_llm_name(args.model_name):
            raise UserError(f"--test_order {test_order}: a language model's task has its own fixed batches of text; "
                            "only an image test set is reordered per chip")
        verify = VerifySettings(points=args.verify, sample=args.verify_sample, cycle=args.cycle,
                                target_se=args.target_se, test_order=test_order,
                                max_cycle=args.max_cycle, fast_draws=args.fast_draws, fast_method=args.fast_method,
                                fast_target_se=args.fast_target_se,
                                memory_mb=args.memory_mb)
    per_layer = None
    if args.per_layer:
        options = SearchOptions(cost=args.per_layer_cost, fields=tuple(args.per_layer_fields),
                                adc_share=args.per_layer_knobs[0], crossbar_columns=args.per_layer_knobs[1],
                                tile_factor=args.tile_factor, device_model=args.device_model,
                                input_term=args.input_term)
        per_layer = PerLayerSettings(options=options, budgets=args.per_layer_budget,
                                     start_fraction=args.per_layer_start)
    return ExploreSettings(
        model_name=args.model_name, dataset=args.dataset, hw_file=args.HWdes, ckpt_dir=args.ckpt_dir,
        ckpt=args.ckpt, data_root=args.data_root, batch_size=args.batch_size, limit=args.limit,
        num_workers=args.num_workers, exclude=args.exclude_layer, include=args.include_layer, block=args.block,
        tokens=args.tokens, random_init=args.random_init, seed=args.seed, device=args.device, gpu_id=args.gpu_id,
        budgets={"area_mm2": args.max_area, "energy_nj": args.max_energy, "latency_us": args.max_latency},
        metric=MetricOptions(args.reduction, args.tile_factor, args.device_model, args.input_term),
        out_dir=args.out_dir,
        verify=verify, records=args.records, per_layer=per_layer)


def main(argv=None) -> int:
    return run_main("explore.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    log = open_log(args.log_file)
    result = run_explore(settings_from_args(args), log)
    for line in outcome_lines(result):
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
