"""Command-line options shared by the entry scripts, with the original tool's names."""

from __future__ import annotations

import argparse

from nipa.data import DATASET_NAMES
from nipa.zoo import CHECKPOINT_DIR


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_name", default="smallcnn",
                        help="a CNN of models.MODEL_NAMES, or a causal LM: a local checkpoint folder, a .gguf "
                             "file, a model id in your transformers cache, or smollm2-135m (see nipa/llm.py)")
    parser.add_argument("--dataset", default="mnist5k",
                        help=f"CNN: one of {', '.join(DATASET_NAMES)}; LLM: a PIQA/ARC-schema .jsonl, a .txt "
                             "(perplexity) or lm-eval task names (see nipa/lm_tasks.py)")
    parser.add_argument("--tasks", default=None, help="LLM: lm-eval task names, e.g. piqa,arc_easy (sets --dataset)")
    parser.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    parser.add_argument("--ckpt_dir", default=CHECKPOINT_DIR)
    parser.add_argument("--ckpt", default=None, help="checkpoint path (default: ckpts/{model}_{dataset}.pt)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 256 images (CNN), 16 sequences (LLM)")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test samples only")


def add_layer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exclude_layer", nargs="*", default=[], metavar="PATTERN",
                        help="layers kept digital: glob patterns on module names (e.g. conv1 'layer4.*')")
    parser.add_argument("--include_layer", nargs="*", default=None, metavar="PATTERN",
                        help="map only these layers (glob patterns); default: every Conv2d/Linear of a CNN, "
                             "the preset block of an LLM")
    parser.add_argument("--block", type=int, default=None,
                        help="LLM: index of the block whose Linear/Conv1D layers are mapped (default: the "
                             "preset's, e.g. OPT 1, others 0)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--gpu_id", type=int, default=None,
                        help="GPU index among the visible ones (CUDA_VISIBLE_DEVICES also works)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (recorded with every result)")


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
    from nipa.llm import is_llm_name

    if getattr(args, "tasks", None):
        args.dataset = args.tasks
    if not is_llm_name(args.model_name) and args.dataset not in DATASET_NAMES:
        parser.error(f"--dataset {args.dataset!r}: for the CNN {args.model_name!r} choose one of "
                     f"{', '.join(DATASET_NAMES)} (or give an LLM with --model_name)")
    return args
