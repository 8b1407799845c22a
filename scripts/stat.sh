#!/usr/bin/env bash
# Bit statistics of one trained model for every shipped search space (one JSON file per model,
# results/stats/$MODEL_$DATASET.json), the input of validate.py.
#   bash scripts/stat.sh
#   MODEL=resnet18 DATASET=cifar10 bash scripts/stat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
python stat.py --model_name "$MODEL" --dataset "$DATASET" \
  --HWdes HW_config/Search_space.ini HW_config/Device_Search_space.ini HW_config/Search_space_mlc.ini "$@"
