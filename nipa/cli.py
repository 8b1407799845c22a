"""Command-line options shared by the entry scripts, with the original tool's names."""

from __future__ import annotations

import argparse

from nipa.data import DATASET_NAMES
from nipa.zoo import CHECKPOINT_DIR


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_name", default="smallcnn", help="model name (see models.MODEL_NAMES)")
    parser.add_argument("--dataset", default="mnist5k", choices=DATASET_NAMES)
    parser.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    parser.add_argument("--ckpt_dir", default=CHECKPOINT_DIR)
    parser.add_argument("--ckpt", default=None, help="checkpoint path (default: ckpts/{model}_{dataset}.pt)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test samples only")


def add_layer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exclude_layer", nargs="*", default=[], metavar="PATTERN",
                        help="layers kept digital: glob patterns on module names (e.g. conv1 'layer4.*')")
    parser.add_argument("--include_layer", nargs="*", default=None, metavar="PATTERN",
                        help="map only these layers (glob patterns); default: every Conv2d/Linear")


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
