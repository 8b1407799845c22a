"""Train a CNN on a dataset and save ckpts/{model}_{dataset}.pt.

    python pretrain.py --model_name resnet18 --dataset cifar100 --log_file results/resnet18/cifar100_train.log
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from nipa.cli import add_runtime_args, run_main
from nipa.data import DATASET_NAMES, get_dataset, make_loader
from nipa.errors import UserError
from nipa.evaluate import evaluate
from nipa.logs import open_log
from nipa.runtime import resolve_device, seed_everything, use_deterministic_algorithms
from nipa.train import default_recipe, fit
from nipa.zoo import CHECKPOINT_DIR, build_model, checkpoint_path, load_trained_model, save_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smallcnn", help="see models.MODEL_NAMES (default smallcnn)")
    parser.add_argument("--dataset", default="mnist5k", choices=DATASET_NAMES)
    parser.add_argument("--data_root", default="data", help="where cifar10/cifar100/imagenet files are")
    parser.add_argument("--download", action="store_true", help="download CIFAR when missing (needs network)")
    parser.add_argument("--ckpt_dir", default=CHECKPOINT_DIR)
    parser.add_argument("--log_file", default=None, help="append progress lines to this file too")
    parser.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels: bit-reproducible training on CUDA too (slower; "
                             "without it CUDA training differs from run to run in the last bits)")
    recipe = parser.add_argument_group("recipe (defaults depend on the dataset, see README)")
    for name, value in default_recipe("cifar10").to_dict().items():
        recipe.add_argument(f"--{name}", type=type(value), default=None)
    add_runtime_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run_main("pretrain.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(default_recipe(args.dataset))
                 if getattr(args, f.name) is not None}
    recipe = dataclasses.replace(default_recipe(args.dataset), **overrides)
    for name in ("epochs", "batch_size", "step_size"):  # a zero would fail late (IndexError) or loop forever
        value = getattr(recipe, name, 1)
        if value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    if not recipe.lr > 0:
        raise UserError(f"--lr {recipe.lr}: the learning rate must be positive")
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
        use_deterministic_algorithms()
    device = resolve_device(args.device, args.gpu_id)
    log = open_log(args.log_file)
    path = checkpoint_path(args.model_name, args.dataset, args.ckpt_dir)
    # Data first: a missing dataset must fail before anything else happens.
    train_set = get_dataset(args.dataset, "train", args.data_root, augment=True, download=args.download)
    test_set = get_dataset(args.dataset, "test", args.data_root, augment=False, download=args.download)
    test_loader = make_loader(test_set, batch_size=recipe.batch_size, shuffle=False, seed=args.seed,
                              num_workers=args.num_workers)

    if path.is_file() and not args.retrain:
        model, meta = load_trained_model(args.model_name, args.dataset, ckpt=path, device=device)
        log(f"{path} exists (trained {meta.get('epochs')} epochs, seed {meta.get('seed')}); "
            "skipping training (--retrain to train again)")
    else:
        seed_everything(args.seed)
        model = build_model(args.model_name, args.dataset).to(device)
        train_loader = make_loader(train_set, batch_size=recipe.batch_size, shuffle=True, seed=args.seed,
                                   num_workers=args.num_workers)
        log(f"training {args.model_name} on {args.dataset} ({len(train_set)} train / {len(test_set)} test) "
            f"on {device}, seed {args.seed}, recipe {recipe.to_dict()}")
        resume = path.with_suffix(".resume.pt")
        if args.retrain and resume.is_file() and not path.is_file():
            log(f"continuing the interrupted run in {resume}")
        result = fit(model, train_loader, test_loader, recipe, device, resume_path=resume, log=log, seed=args.seed)
        meta = {"model": args.model_name.lower(), "dataset": args.dataset,
                "num_classes": train_set.num_classes, "input_shape": list(test_set[0][0].shape),
                "epochs": recipe.epochs, "seed": args.seed, "recipe": recipe.to_dict(),
                "train_seconds": result["seconds"], "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "device": str(device), "deterministic": args.deterministic}
        meta.update({f"test_{k}": v for k, v in result["history"][-1].items() if k in ("top1", "top5")})
        save_checkpoint(path, model, meta)
        resume.unlink(missing_ok=True)
        log(f"saved {path}")
    metrics = evaluate(model, test_loader, device)
    log(f"{args.model_name} on {args.dataset}: test top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
        f"({metrics['samples']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
