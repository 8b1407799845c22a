"""Command-line options shared by the entry scripts, with the original tool's names."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from nipa.errors import UserError
from nipa.runtime import configure_precision
from nipa.workloads.datasets import DATASET_NAMES
from nipa.workloads.zoo import CHECKPOINT_DIR

# Exit codes: 2 for a user error (argparse's code for a bad option), 130 for Ctrl-C (128 + SIGINT).
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback instead of the one-line message")


def run_main(script: str, parse: Callable[[Sequence[str] | None], argparse.Namespace],
             run: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None = None) -> int:
    """Parse the options and run a script: a user error (UserError, a missing file) is printed as
    `script: error: ...` and returns 2, Ctrl-C returns 130, both without a traceback unless --debug.
    argparse's own errors (SystemExit) are returned as their exit code, so `main(argv)` never exits."""
    debug = argv is not None and "--debug" in argv or argv is None and "--debug" in sys.argv[1:]
    try:
        args = parse(argv)
        debug = bool(getattr(args, "debug", debug))
        configure_precision(bool(getattr(args, "allow_tf32", False)))  # off unless asked for, every script
        code = run(args)
    except SystemExit as exc:  # argparse has printed its message already
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{script}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            raise
        print(f"{script}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return code if isinstance(code, int) else 0  # a run that returns its results (validate) succeeded


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_name", default="smallcnn",
                        help="a CNN of models.MODEL_NAMES, or a causal LM: a local checkpoint folder, a .gguf "
                             "file, a model id in your transformers cache, or smollm2-135m (see nipa/llm/load.py)")
    parser.add_argument("--dataset", default="mnist5k",
                        help=f"CNN: one of {', '.join(DATASET_NAMES)}; LLM: a PIQA/ARC-schema .jsonl, a .txt "
                             "(perplexity) or lm-eval task names (see nipa/llm/tasks.py)")
    parser.add_argument("--tasks", default=None, help="LLM: lm-eval task names, e.g. piqa,arc_easy (sets --dataset)")
    parser.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    parser.add_argument("--ckpt_dir", default=CHECKPOINT_DIR)
    parser.add_argument("--ckpt", default=None, help="checkpoint path (default: ckpts/{model}_{dataset}.pt)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 256 images (CNN), 16 sequences (LLM)")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test samples only")
    add_text_window_args(parser)
    add_user_model_args(parser)
    add_user_data_args(parser)


def add_text_window_args(parser: argparse.ArgumentParser) -> None:
    """--seq_len / --max_tokens of a perplexity text (an LLM with --dataset pydoc or a .txt file); folded into
    the dataset's name by resolve_model_args, so records and result paths carry the window set."""
    parser.add_argument("--seq_len", type=int, default=None,
                        help="LLM perplexity text: tokens per window (default 512)")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="LLM perplexity text: evaluate its first N tokens (default: 32768 for pydoc, the "
                             "whole .txt file)")


def add_user_model_args(parser: argparse.ArgumentParser) -> None:
    """Options of a user's own model (--model_name file.py:ClassName, model.pt, model.pt2;
    nipa/workloads/usermodel.py)."""
    group = parser.add_argument_group("your own model (--model_name file.py:ClassName | model.pt | model.pt2)")
    group.add_argument("--model_kwargs", default=None, metavar="JSON",
                       help="keyword arguments of ClassName, e.g. '{\"num_classes\": 10}'")
    group.add_argument("--allow_pickle", action="store_true",
                       help="allow --model_name to be a full pickled module (loading a pickle runs its code)")


def add_user_data_args(parser: argparse.ArgumentParser) -> None:
    """Options of a user's own data (--dataset folder | data.pt | data.npz; nipa/workloads/userdata.py)."""
    group = parser.add_argument_group("your own data (--dataset image folder | data.pt | data.npz)")
    group.add_argument("--input_size", default=None, metavar="N|HxW",
                       help="image folder: resize and centre-crop every image to this size")
    group.add_argument("--mean", type=float, nargs="+", default=None, help="image folder: per-channel mean")
    group.add_argument("--std", type=float, nargs="+", default=None, help="image folder: per-channel std")
    group.add_argument("--split", type=float, default=None, metavar="FRACTION",
                       help="tensor file holding one set (x, y): train share of a permutation seeded by --seed")


def add_layer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exclude_layer", nargs="*", default=[], metavar="PATTERN",
                        help="layers kept digital: glob patterns on module names (e.g. conv1 'layer4.*')")
    parser.add_argument("--include_layer", nargs="*", default=None, metavar="PATTERN",
                        help="map only these layers (glob patterns); default: every Conv2d/Linear of a CNN, "
                             "the preset block of an LLM")
    parser.add_argument("--block", default=None, metavar="N|LIST|spread:N|all",
                        help="LLM: the blocks whose Linear/Conv1D layers are mapped: 5, 0,5,10-12, spread:4 "
                             "(4 evenly spaced, first and last included) or all (default: the preset's one "
                             "block, e.g. OPT 1, others 0)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--gpu_id", type=int, default=None,
                        help="GPU index among the visible ones (CUDA_VISIBLE_DEVICES also works)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (recorded with every result)")
    parser.add_argument("--allow_tf32", action="store_true",
                        help="let CUDA products use TF32 (faster, ~5e-4 relative error nothing models; "
                             "recorded as tf32 in the records); default: full float32")
    add_debug_arg(parser)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def resolve_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--tasks into --dataset; a CNN's dataset must be one of the project's (checked before any work)."""
    from nipa.llm.load import is_llm_name
    from nipa.workloads.userdata import is_user_dataset

    if getattr(args, "tasks", None):
        args.dataset = args.tasks
    seq_len, max_tokens = getattr(args, "seq_len", None), getattr(args, "max_tokens", None)
    if seq_len is not None or max_tokens is not None:
        from nipa.llm.tasks import TaskFileError, with_windows

        if not is_llm_name(args.model_name):
            parser.error("--seq_len/--max_tokens: apply to a language model's perplexity text")
        try:
            args.dataset = with_windows(args.dataset, seq_len, max_tokens)
        except TaskFileError as exc:
            parser.error(str(exc))
    # Values that used to be replaced silently (0 -> the default batch size, the whole test set).
    for option in ("batch_size", "limit"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            parser.error(f"--{option} {value}: must be a positive whole number (leave it out for the default)")
    if getattr(args, "num_workers", 0) < 0:
        parser.error(f"--num_workers {args.num_workers}: cannot be negative (0 loads data in this process)")
    split = getattr(args, "split", None)
    if split is not None and not 0 < split < 1:
        parser.error(f"--split {split}: the train share must lie strictly between 0 and 1, e.g. 0.8")
    if not is_llm_name(args.model_name) and args.dataset not in DATASET_NAMES \
            and not is_user_dataset(args.dataset):
        parser.error(f"--dataset {args.dataset!r}: for the CNN {args.model_name!r} choose one of "
                     f"{', '.join(DATASET_NAMES)}, an image folder or a tensor file (.pt, .npz) "
                     "(or give an LLM with --model_name)")
    return args


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    """explore.py's verification against the ground truth (nipa.pipelines.explore.VerifySettings)."""
    from nipa.estimation.inject import DEFAULT_METHOD, METHODS
    from nipa.pipelines.explore import VERIFY_SAMPLES

    verify = parser.add_argument_group("verification against the ground truth")
    verify.add_argument("--verify", type=int, default=0, metavar="N",
                        help="simulate N points (fronts first, then stratified over NIPA); 0: no verification")
    verify.add_argument("--verify_sample", choices=VERIFY_SAMPLES, default="fronts",
                        help="which points --verify simulates: fronts (the fronts first, then stratified over NIPA: "
                             "checks the fronts) or random (a seeded uniform sample of the space's simulation "
                             "points: checks the fast estimate over the whole space)")
    verify.add_argument("--cycle", type=int, default=3, help="minimum chips per verified point")
    verify.add_argument("--target_se", type=float, default=0.25,
                        help="add chips until the standard error of a point's mean is below this (accuracy points), "
                             "judged at a 90%% upper confidence bound on the chips' spread")
    verify.add_argument("--max_cycle", type=int, default=20, help="at most this many chips per point")
    verify.add_argument("--test_order", choices=("fixed", "per_chip"), default=None,
                        help="per_chip (default for image data): every chip reads the test set in its own order, "
                             "so a dynamic ADC's dependence on the batch enters the standard error; fixed: the "
                             "file's order for every chip (the only choice for a language model's task)")
    verify.add_argument("--fast_draws", type=int, default=3,
                        help="draws of the fast estimate per point (at least, with --fast_target_se)")
    verify.add_argument("--fast_target_se", type=float, default=None,
                        help="add draws of the fast estimate until the standard error of their mean is at most "
                             "this (at most --max_cycle), as the chips")
    verify.add_argument("--fast_method", choices=tuple(METHODS), default=DEFAULT_METHOD,
                        help="wrap_error.py's method for the fast estimate")
    verify.add_argument("--records", default=None,
                        help="ground-truth records (default results/{model}/{dataset}_explore_accsim.jsonl)")
    verify.add_argument("--memory_mb", type=float, default=None,
                        help="memory budget of one crossbar product (default: 256 on a CPU, a quarter of the "
                             "free memory on a GPU)")


def add_per_layer_search_args(parser: argparse.ArgumentParser) -> None:
    """explore.py --per_layer and its options (nipa.pipelines.layer_search.PerLayerSettings); checked and split into
    lists by resolve_per_layer_search_args."""
    from nipa.pipelines.explore import COSTS
    from nipa.pipelines.layer_search import SEARCH_FIELDS

    per_layer = parser.add_argument_group("per-layer search (nipa.pipelines.layer_search)")
    per_layer.add_argument("--per_layer", action="store_true",
                           help="under a few cost budgets, start from a uniform point and raise the ADC, weight or "
                                "input bits of the layers where NIPA gains most per cost; simulate each result "
                                "against the uniform point of highest NIPA within the same budget")
    per_layer.add_argument("--per_layer_cost", choices=COSTS, default="energy_nj", help="the cost the budgets limit")
    per_layer.add_argument("--per_layer_budget", type=float, action="append", default=None, metavar="B",
                           help="a budget (repeatable; default: the 5th, 10th, 25th and 50th percentiles of the "
                                "cost over the space's points without device error)")
    per_layer.add_argument("--per_layer_start", type=float, default=0.8,
                           help="the search starts at the best uniform point within this share of the budget")
    per_layer.add_argument("--per_layer_fields", default=",".join(SEARCH_FIELDS),
                           help=f"the per-layer fields the search may raise (default {','.join(SEARCH_FIELDS)})")
    per_layer.add_argument("--per_layer_knobs", default="16,256", metavar="ADC_SHARE,COLUMNS",
                           help="the cost-only knobs of the searched points (default 16,256)")


def resolve_per_layer_search_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--per_layer_fields and --per_layer_knobs into lists; every bad per-layer value is a parser error."""
    from nipa.pipelines.layer_search import SEARCH_FIELDS

    args.per_layer_fields = [f.strip() for f in args.per_layer_fields.split(",") if f.strip()]
    unknown = [f for f in args.per_layer_fields if f not in SEARCH_FIELDS]
    if unknown or not args.per_layer_fields:
        parser.error(f"--per_layer_fields {unknown or '(none)'}: choose among {', '.join(SEARCH_FIELDS)}")
    try:
        args.per_layer_knobs = [int(v) for v in args.per_layer_knobs.split(",")]
        if len(args.per_layer_knobs) != 2 or min(args.per_layer_knobs) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--per_layer_knobs {args.per_layer_knobs!r}: give ADC_SHARE,COLUMNS, two whole numbers >= 1")
    if not 0 < args.per_layer_start <= 1 or any(b <= 0 for b in args.per_layer_budget or ()):
        parser.error("need 0 < --per_layer_start <= 1 and positive --per_layer_budget values")
    return args
