"""NIPA against the ground truth: does the metric rank hardware points as the slicing simulation does?

    python validate.py --model_name smallcnn --dataset mnist5k
    python validate.py --model_name smallcnn --dataset mnist5k --color_by ADCprecision --per_layer
    python validate.py --model_name smallcnn --dataset mnist5k --reduction layer_sum --tile_factor one

Reads the records main.py wrote (default results/{model}/{dataset}_accsim.jsonl, shards included) and
the bit statistics stat.py wrote (default results/stats/{model}_{dataset}.json), averages the chips of
every hardware point, computes NIPA per point and reports Kendall's tau-b, Spearman and Pearson between
log2(NIPA) and the accuracy, with p-values and seeded bootstrap confidence intervals, on all points and
per variation type, cellBit and weight bits. No point is dropped. Writes, in --out_dir (default
results/{model}/):

    {dataset}_nipa_points.csv     one row per point: its parameters, accuracy mean/std/chips, NIPA terms
    {dataset}_nipa.png            log2 NIPA against accuracy, coloured by --color_by; float accuracy line
    {dataset}_nipa_summary.json   every coefficient, p-value, interval and n, and the settings used
    {dataset}_nipa_layers.csv     with --per_layer: the layers ranked by sensitivity

A metric variant (--reduction / --tile_factor / --device_model other than the published defaults) inserts
its name into
the file names (e.g. {dataset}_nipa_layer_sum_points.csv), so it never overwrites the published form.

--measure loss or perplexity (an LLM's text task records no accuracy) judges NIPA against that instead and
inserts its name (e.g. {dataset}_nipa_perplexity_summary.json). Lower is better there, so the correlations
are computed against minus the measure: agreement is positive, as for accuracy (the summary says "sign": -1).
With top-1 (the headline, as in the paper) the test loss is reported beside it when the records hold it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from nipa.cli import (
    add_debug_arg,
    add_text_window_args,
    add_user_data_args,
    add_user_model_args,
    resolve_model_args,
    run_main,
)
from nipa.estimation.metric import ADC_TERMS, DEVICE_MODELS, REDUCTIONS, TILE_FACTORS
from nipa.pipelines.validation import (
    COLOR_FIELDS,
    DEFAULT_GROUPS,
    DEFAULTS,
    GROUP_FIELDS,
    ValidateSettings,
    run_validation,
)
from nipa.results.validation_report import format_report
from nipa.workloads.datasets import DATASET_NAMES


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # allow_abbrev=False: `--device cuda` (validate.py has no --device) must not be read as --device_model.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model_name", default="smallcnn",
                        help="a CNN (default smallcnn) or a causal LM, as given to main.py")
    parser.add_argument("--dataset", default="mnist5k",
                        help=f"CNN: one of {', '.join(DATASET_NAMES)}; LLM: the task given to main.py")
    parser.add_argument("--tasks", default=None, help="LLM: lm-eval task names (sets --dataset)")
    parser.add_argument("--records", default=None,
                        help="results JSONL of main.py (default results/{model}/{dataset}_accsim.jsonl)")
    parser.add_argument("--stats", default=None,
                        help="statistics JSON of stat.py (default results/stats/{model}_{dataset}.json)")
    parser.add_argument("--out_dir", default=None, help="where the CSV/PNG/JSON go (default results/{model}/)")
    parser.add_argument("--reduction", choices=REDUCTIONS, default=DEFAULTS["reduction"],
                        help="model_average (published: layer-averaged statistics in one formula) or "
                             "layer_sum (sum of per-layer signals over sum of per-layer noises)")
    parser.add_argument("--adc_term", choices=ADC_TERMS, default=DEFAULTS["adc_term"],
                        help="ADC step of the metric: ground_truth (default: as each point's ADC mode reads, "
                             "one range shared by a layer's tiles in dynamic mode) or published (S density_k "
                             "/ 2^a_r, a range per tile)")
    parser.add_argument("--tile_factor", choices=TILE_FACTORS, default=DEFAULTS["tile_factor"],
                        help="k_T of the ADC term: tiles (published, k_T = T) or one (k_T = 1)")
    parser.add_argument("--device_model", choices=DEVICE_MODELS, default=DEFAULTS["device_model"],
                        help="device term: published (sigma_dev,k^2 as the paper writes it) or cells (the "
                             "expected read error of the slice's differential pair under the simulator's "
                             "cell model; exact stuck-at faults, both cells' noise; see nipa/estimation/metric.py)")
    parser.add_argument("--accuracy", choices=("top1", "top5"), default="top1",
                        help="top1 (for an LLM's multiple-choice task: acc) or top5")
    parser.add_argument("--measure", choices=("top1", "top5", "loss", "perplexity"), default=None,
                        help="what the ground truth is judged by (default: --accuracy): loss (test cross-entropy) "
                             "or perplexity (an LLM's text task) are lower-is-better, so their correlations are "
                             "taken with minus the measure (agreement positive)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0 = no CIs)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--color_by", choices=COLOR_FIELDS, default="wl_weight")
    parser.add_argument("--group_by", nargs="*", choices=GROUP_FIELDS, default=list(DEFAULT_GROUPS),
                        help=f"parameters to report per value of (default: {' '.join(DEFAULT_GROUPS)})")
    parser.add_argument("--per_layer", action="store_true",
                        help="rank the layers by sensitivity (per-layer NIPA) at one point")
    parser.add_argument("--point_index", type=int, default=None,
                        help="with --per_layer: row of the points CSV (default: the median-NIPA point)")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG")
    noise = parser.add_argument_group("measured layer noise (--layer_noise; loads the model, runs the simulator)")
    noise.add_argument("--layer_noise", action="store_true",
                       help="also measure every mapped layer's noise on the recorded points' chips (one batch "
                            "of calibration data through the float and the crossbar layer) and report how NIPA "
                            "ranks it: a check of the metric that does not go through the accuracy")
    noise.add_argument("--layer_noise_chips", type=int, default=3,
                       help="chips per point (chips 0, 1, ... of the ground truth's seed)")
    noise.add_argument("--layer_noise_batch", type=int, default=None,
                       help="inputs in the batch (default: 256 images for a CNN, 16 sequences for an LLM)")
    noise.add_argument("--ckpt_dir", default="ckpts")
    noise.add_argument("--ckpt", default=None, help="checkpoint (default: ckpts/{model}_{dataset}.pt)")
    noise.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    add_text_window_args(parser)
    add_user_model_args(parser)
    add_user_data_args(parser)
    add_debug_arg(parser)
    args = resolve_model_args(parser, parser.parse_args(argv))
    if args.measure is not None and args.accuracy != "top1" and args.measure != args.accuracy:
        parser.error(f"--accuracy {args.accuracy} and --measure {args.measure}: give one of them")
    args.measure = args.measure or args.accuracy
    if args.measure in ("top1", "top5"):
        args.accuracy = args.measure
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if not 0 < args.confidence < 1:
        parser.error("--confidence must lie in (0, 1)")
    if args.layer_noise_chips < 1:
        parser.error("--layer_noise_chips must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything validate.py does; returns the summary that is also written as JSON."""
    settings = ValidateSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ValidateSettings)
                                   if hasattr(args, f.name)})
    if args.layer_noise:  # the model and data the chips are programmed for
        from nipa.workloads.workload import Workload

        settings.workload = Workload.from_args(args)
    result = run_validation(settings)
    print(format_report(result))
    return result.summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("validate.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
