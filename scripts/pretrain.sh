#!/usr/bin/env bash
# The paper's CNNs on CIFAR-10/100 with the original tool's recipe (SGD lr 0.01, momentum 0.9, weight
# decay 5e-4, StepLR every 50 epochs by 0.2, 200 epochs, batch 256; README, pretrain.py). The CIFAR
# python pickles must be under data/ (or pass --download on a machine with network access). One model
# per line; checkpoints go to ckpts/{model}_{dataset}.pt, logs to results/{model}/{dataset}_train.log.
#   bash scripts/pretrain.sh                 # every model on cifar10 and cifar100 (GPU-days)
#   MODELS="resnet18" DATASETS="cifar100" bash scripts/pretrain.sh
#   CUDA_VISIBLE_DEVICES=0 bash scripts/pretrain.sh --deterministic
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-"resnet18 resnet34 vgg16 mobilenetv2 efficientnetv2s"}
DATASETS=${DATASETS:-"cifar10 cifar100"}
for dataset in $DATASETS; do
  for model in $MODELS; do
    mkdir -p "results/$model"
    python pretrain.py --model_name "$model" --dataset "$dataset" \
      --log_file "results/$model/${dataset}_train.log" "$@"
  done
done
