"""Train a CNN on a dataset and save ckpts/{model}_{dataset}.pt.

    python pretrain.py --model_name resnet18 --dataset cifar100 --log_file results/resnet18/cifar100_train.log
    python pretrain.py --model_name net.py:TinyNet --dataset data.npz --split 0.8 --epochs 5 --ckpt tiny.pt

Your own model class (file.py:ClassName, --model_kwargs) or data (an image folder or a tensor file) train
the same way; main.py, stat.py, validate.py and wrap_error.py then load the checkpoint with --ckpt.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nipa.cli import add_runtime_args, add_user_data_args, add_user_model_args, run_main
from nipa.logs import open_log
from nipa.pipelines.pretraining import PretrainSettings, run_pretrain
from nipa.pipelines.train import default_recipe
from nipa.workloads.datasets import DATASET_NAMES
from nipa.workloads.userdata import is_user_dataset
from nipa.workloads.zoo import CHECKPOINT_DIR


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smallcnn", help="see models.MODEL_NAMES (default smallcnn)")
    parser.add_argument("--dataset", default="mnist5k",
                        help=f"one of {', '.join(DATASET_NAMES)}, an image folder or a tensor file (.pt, .npz)")
    parser.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    parser.add_argument("--download", action="store_true", help="download CIFAR when missing (needs network)")
    parser.add_argument("--ckpt_dir", default=CHECKPOINT_DIR)
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint to write (default: {ckpt_dir}/{model}_{dataset}.pt)")
    parser.add_argument("--log_file", default=None, help="append progress lines to this file too")
    parser.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels: bit-reproducible training on CUDA too (slower; "
                             "without it CUDA training differs from run to run in the last bits)")
    recipe = parser.add_argument_group("recipe (defaults depend on the dataset, see README)")
    for name, value in default_recipe("cifar10").to_dict().items():
        recipe.add_argument(f"--{name}", type=type(value), default=None)
    add_user_model_args(parser)
    add_user_data_args(parser)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.dataset not in DATASET_NAMES and not is_user_dataset(args.dataset):
        parser.error(f"--dataset {args.dataset!r}: choose one of {', '.join(DATASET_NAMES)}, an image folder or a "
                     "tensor file (.pt, .npz)")
    if args.split is not None and not 0 < args.split < 1:
        parser.error(f"--split {args.split}: the train share must lie strictly between 0 and 1, e.g. 0.8")
    return args


def main(argv=None) -> int:
    return run_main("pretrain.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    recipe = {f.name: getattr(args, f.name) for f in dataclasses.fields(default_recipe(args.dataset))
              if getattr(args, f.name) is not None}
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainSettings)
                                   if f.name != "recipe" and hasattr(args, f.name)}, recipe=recipe)
    run_pretrain(settings, open_log(args.log_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
