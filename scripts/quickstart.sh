#!/usr/bin/env bash
# The main job on the embedded default: train the small CNN on the offline MNIST digits, then
# simulate a small sample of the default search space on crossbars (ground truth).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
python pretrain.py --model_name "$MODEL" --dataset "$DATASET" --log_file "results/$MODEL/${DATASET}_train.log"
python main.py --model_name "$MODEL" --dataset "$DATASET" --HWdes HW_config/Search_space.ini \
  --sample_num "${SAMPLE_NUM:-6}" --cycle "${CYCLE:-2}" --batch_size 256 \
  --log_file "results/$MODEL/${DATASET}_accsim.log"
