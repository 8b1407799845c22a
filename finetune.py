"""MLC one-to-one mapping with device variation, and non-ideal device fine-tuning (SPEC section 9).

    python finetune.py --model_name smallcnn --dataset mnist5k --cellbit 3 --vari_type state_dependent \\
        --vari 0.2 0.4 0.6 0.8 --chips 5 --calib_samples 512

Maps every weight one-to-one onto a multi-level cell pair (wl_weight = cellbit + 1), programs --chips
chips per variation with fixed device error, and compares on the same chips: no fine-tuning, batch-norm
re-estimation, label-only fine-tuning, variation-aware training and the proposed fine-tuning in its two
modes (digital parameters only; cell targets re-programmed too). Records (one JSON line per method and
chip) go to results/{model}/{dataset}_finetune.jsonl; the summary table to {dataset}_finetune.csv and
the accuracy-against-variation plot to {dataset}_finetune.png beside it. A rerun skips finished records.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from nipa.cli import add_layer_args, add_model_args, add_runtime_args, resolve_model_args, run_main
from nipa.hardware.config import VARI_TYPES
from nipa.llm.load import is_llm_name
from nipa.pipelines.finetune import METHODS, FinetuneJobSettings, FinetuneSettings, run_finetune_job
from nipa.simulator.mlc import mlc_hw


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    chip = parser.add_argument_group("chip")
    chip.add_argument("--cellbit", type=int, default=3, help="bits per cell; weights get cellbit + 1 bits")
    chip.add_argument("--vari_type", choices=VARI_TYPES, default="state_dependent")
    chip.add_argument("--vari", type=float, nargs="+", default=[0.6],
                      help="spread(s) of --vari_type (vari, ind_vari or laplace_b); several values sweep")
    chip.add_argument("--SAF_prop", type=float, default=0.0, help="stuck-at-0 and stuck-at-1 probability")
    chip.add_argument("--onoffratio", type=float, default=1e8)
    chip.add_argument("--chips", type=int, default=5, help="programmed chips per variation")
    chip.add_argument("--input_bits", type=int, default=None, help="quantize layer inputs (off by default)")
    chip.add_argument("--read_noise", type=float, default=0.0, help="relative per-read cell noise (default 0)")
    chip.add_argument("--adc_bits", type=int, default=None, help="ADC bits (default: no ADC)")
    chip.add_argument("--adc_rows", type=int, default=128, help="crossbar rows per ADC conversion")
    method = parser.add_argument_group("methods")
    method.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    defaults = FinetuneSettings()
    helps = {"calib_samples": "train-split images used on the chip", "epochs": "fine-tuning epochs",
             "batch_size": "fine-tuning batch size", "lr": "Adam learning rate of digital parameters",
             "cell_lr": "learning rate of the cell targets (mode cells)", "kd_temperature": "KD temperature T",
             "kd_weight": "KD share alpha of the logit loss", "layer_weight": "weight beta of layer matching",
             "reprogram_every": "steps between re-programmings (mode cells)",
             "cell_epochs": "epochs that move cell targets before digital-only polishing",
             "vat_epochs": "variation-aware training epochs (train split)", "vat_lr": "VAT SGD learning rate",
             "vat_batch_size": "VAT batch size"}
    for field in dataclasses.fields(FinetuneSettings):
        value = getattr(defaults, field.name)
        flag = "--ft_batch_size" if field.name == "batch_size" else f"--{field.name}"
        method.add_argument(flag, dest=f"ft_{field.name}", type=type(value), default=value,
                            help=f"{helps.get(field.name, '')} (default {value})")
    parser.add_argument("--out", default=None, help="records JSONL (default results/{model}/{dataset}_finetune.jsonl)")
    parser.add_argument("--log_file", default=None, help="readable progress lines are appended here")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    add_layer_args(parser)
    add_runtime_args(parser)
    args = resolve_model_args(parser, parser.parse_args(argv))
    if is_llm_name(args.model_name) or args.block is not None:
        parser.error(f"--model_name {args.model_name}: finetune.py fine-tunes the project's CNNs "
                     "(models.MODEL_NAMES); language models are not supported")
    if args.chips < 1:
        parser.error(f"--chips {args.chips}: need at least one chip")
    if args.ft_calib_samples < 1:
        parser.error(f"--calib_samples {args.ft_calib_samples}: need at least one image")
    if not 1 <= args.cellbit <= 8:  # before mlc_hw, whose message would speak of wl_weight = cellbit + 1
        parser.error(f"--cellbit {args.cellbit}: bits per cell must lie in 1..8")
    try:  # every bad hardware value is reported before any work starts
        for spread in args.vari:
            mlc_hw(args.cellbit, args.vari_type, spread, args.SAF_prop, args.onoffratio)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> int:
    return run_main("finetune.py", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    hyper = FinetuneSettings(**{f.name: getattr(args, f"ft_{f.name}") for f in dataclasses.fields(FinetuneSettings)})
    job = FinetuneJobSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneJobSettings)
                                 if hasattr(args, f.name)}, finetune=hyper)
    run_finetune_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
