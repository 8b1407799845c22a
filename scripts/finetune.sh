#!/usr/bin/env bash
# MLC one-to-one mapping with device variation and device fine-tuning (SPEC section 9): the headline run.
# 3-bit cells (4-bit weights), state-dependent programming variation swept 0.2..0.8, 5 chips per point,
# 512 calibration images from the train split; every method on the same chips. About 1 h on 1 CPU core.
#   bash scripts/finetune.sh                              # smallcnn on mnist5k
#   MODEL=resnet18 DATASET=cifar10 bash scripts/finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
mkdir -p "results/$MODEL"
python finetune.py --model_name "$MODEL" --dataset "$DATASET" --cellbit 3 --vari_type state_dependent \
  --vari 0.2 0.4 0.6 0.8 --chips 5 --calib_samples 512 --epochs 20 --cell_epochs 10 --cell_lr 5e-4 \
  --vat_epochs 10 --seed 0 --log_file "results/$MODEL/${DATASET}_finetune.log" "$@"
