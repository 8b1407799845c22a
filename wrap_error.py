"""Non-slicing absolute accuracy: one forward pass with an equivalent error injected per layer, against
the bit-and-crossbar ground truth of main.py, with the speedup measured in the same run (SPEC section 7).

    python wrap_error.py --model_name smallcnn --dataset mnist5k --cycle 3 \
        --log_file results/smallcnn/mnist5k_wrap.log

Reads results/{model}/{dataset}_accsim.jsonl (--ground_truth), evaluates --cycle injection draws per
recorded hardware point (their mean is the prediction, never the draw nearest the ground truth),
appends one record per draw to results/{model}/{dataset}_wrap.jsonl (--out; an interrupted run
resumes), prints the per-point table and writes <out stem>_summary.json and <out stem>.png beside it
(a method other than the default adds its name: {dataset}_wrap_published_summary.json). Both methods
are timed in the same run on --time_points points spread over the grid, on the same data, batch size
and device.

Beside the mean error it reports the error per region (points within 2 accuracy points of the float model,
and the rest; for perplexity within 2%, for loss 0.02 nats) and the 5 worst points, so a user sees where to
trust the estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from nipa.cli import add_model_args, add_runtime_args, resolve_model_args, run_main
from nipa.estimation.inject import (
    ADC_FORMS,
    ADC_MODELS,
    CALIBRATION_UPSTREAMS,
    DEFAULT_CALIB_BATCHES,
    DEFAULT_METHOD,
    DEVICE_MODELS,
    METHODS,
)
from nipa.logs import open_log
from nipa.pipelines.absolute import WrapErrorSettings, run_wrap_error
from nipa.workloads.workload import Workload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(batch_size=None)  # default: the ground truth's
    parser.add_argument("--cycle", type=int, default=3,
                        help="injection draws per point (their mean is reported; at least, with --target_se)")
    parser.add_argument("--target_se", type=float, default=None,
                        help="add draws to a point until the standard error of their mean is at most this "
                             "(accuracy points; as explore.py's chips, judged at a 90%% upper confidence bound on "
                             "the draws' spread): where chips differ by several points, a few draws scatter as much")
    parser.add_argument("--max_cycle", type=int, default=None,
                        help="with --target_se, at most this many draws per point (default 10 x --cycle)")
    parser.add_argument("--method", choices=tuple(METHODS), default=DEFAULT_METHOD,
                        help="repeated (default): device errors from the cell model; the ADC error measured "
                             "on calibration data, exact for the input rows a layer reads again and again "
                             "(>= 1%% of its calibration rows, an error the calibration batches agree on), "
                             "fresh output noise of the other rows' power elsewhere, calibrated on the "
                             "simulator's activations; calibrated: the same error as output noise on every "
                             "row, calibrated on the ideal model's activations; planes: the same, but planes "
                             "with a known read (zero, constant patches) get the ADC's exact error and the "
                             "others the mean and noise of their class, calibrated on the simulator's own "
                             "activations (README, Error injection); conditional: the error per bin of the "
                             "ideal output; published: SPEC section 7 as written (formula noise on the "
                             "weight slices)")
    parser.add_argument("--device_error", choices=DEVICE_MODELS, default=None,
                        help="override the method's device part")
    parser.add_argument("--adc_error", choices=ADC_MODELS, default=None,
                        help="override the method's ADC part")
    parser.add_argument("--adc_form", choices=ADC_FORMS, default=None,
                        help="measured ADC error as fresh output noise (output), as weight noise fixed per "
                             "draw (weight), per bin of the ideal output (conditional), per bit-plane class "
                             "(planes) or exactly for repeated input rows (repeated); default: the method's")
    parser.add_argument("--tile_factor", choices=("tiles", "one"), default="tiles",
                        help="k_T of the formula ADC term (SPEC: the tile count T)")
    parser.add_argument("--calib_batches", type=int, default=DEFAULT_CALIB_BATCHES,
                        help="training batches (of --batch_size) on which the ADC error is measured (a dynamic "
                             "range is one batch's: one batch misjudges the error up to 3x, README)")
    parser.add_argument("--calib_upstream", choices=CALIBRATION_UPSTREAMS, default=None,
                        help="the layer inputs the ADC calibration reads: the ideal quantized model's (the "
                             "default of calibrated, conditional) or the simulator's own, ideal cells and the "
                             "point's ADC (the default of planes; one pass per ADC resolution): a coarse ADC's "
                             "offsets upstream move the ranges of the layers below (README, Error injection)")
    parser.add_argument("--measure", choices=("top1", "loss", "perplexity"), default="top1",
                        help="what is predicted and compared: top1 (default; the test loss is reported beside "
                             "it), loss, or perplexity (an LLM's text task); a measure other than top1 names its "
                             "summary and plot (<out stem>_perplexity_summary.json)")
    parser.add_argument("--untrusted", choices=("estimate", "simulate"), default="estimate",
                        help="what a point the trust check does not trust gets (ADC error above 0.1 of the signal "
                             "in some layer, README): the estimate all the same (default), or chips of the "
                             "simulator, other chips than the ground truth's, as many as the draws (adaptive "
                             "fidelity: the summary compares it with the estimate alone and gives its cost)")
    parser.add_argument("--paired_chips", action="store_true",
                        help="diagnostic: draw d uses the simulator's chip d cells, which separates the "
                             "method's error from the sampling of chips (not a prediction)")
    parser.add_argument("--time_points", type=int, default=5,
                        help="points on which both methods are timed in this run (0: no timing)")
    parser.add_argument("--memory_mb", type=float, default=None,
                        help="memory budget of the simulator's and the calibration's products (default: 256 "
                             "on a CPU, a quarter of the free memory on a GPU)")
    parser.add_argument("--ground_truth", default=None,
                        help="main.py records (default results/{model}/{dataset}_accsim.jsonl)")
    parser.add_argument("--stats", default=None,
                        help="statistics for formula terms (default results/stats/{model}_{dataset}.json)")
    parser.add_argument("--out", default=None,
                        help="records of the fast method (default results/{model}/{dataset}_wrap.jsonl)")
    parser.add_argument("--plot", default=None,
                        help="scatter plot (default <out stem>.png beside --out)")
    parser.add_argument("--log_file", default=None, help="readable progress lines are appended here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both methods (default: torch's; 1 is steadier when busy)")
    add_runtime_args(parser)
    args = resolve_model_args(parser, parser.parse_args(argv))
    if args.cycle < 1:
        parser.error(f"--cycle {args.cycle}: need at least one draw")
    if args.target_se is not None and not args.target_se > 0:
        parser.error(f"--target_se {args.target_se}: must be positive")
    if args.max_cycle is not None and (args.target_se is None or args.max_cycle < args.cycle):
        parser.error(f"--max_cycle {args.max_cycle}: needs --target_se and at least --cycle {args.cycle}")
    if args.calib_batches < 1:
        parser.error(f"--calib_batches {args.calib_batches}: need at least one batch")
    if args.memory_mb is not None and not args.memory_mb > 0:
        parser.error(f"--memory_mb {args.memory_mb}: must be positive (megabytes of one crossbar product)")
    if args.time_points < 0:
        parser.error(f"--time_points {args.time_points}: cannot be negative (0: no timing)")
    return args


def main(argv=None) -> int:
    return run_main("wrap_error.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = WrapErrorSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WrapErrorSettings)
                                    if hasattr(args, f.name)}, default_method=DEFAULT_METHOD,
                                 workload=Workload.from_args(args))
    run_wrap_error(settings, open_log(args.log_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
