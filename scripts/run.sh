#!/usr/bin/env bash
# Ground-truth sweep of one model: the original's command line. Several GPUs: one shard each.
#   bash scripts/run.sh                       # one process
#   NUM_SHARDS=4 bash scripts/run.sh          # 4 processes on GPUs 0..3, records merge by themselves
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
HWDES=${HWDES:-HW_config/Search_space.ini}
NUM_SHARDS=${NUM_SHARDS:-1}
mkdir -p "results/$MODEL"
if [ "$NUM_SHARDS" -eq 1 ]; then
  python main.py --model_name "$MODEL" --dataset "$DATASET" --HWdes "$HWDES" --sample_num 0 --cycle 3 \
    --batch_size 256 --log_file "results/$MODEL/${DATASET}_accsim.log"
else
  for i in $(seq 0 $((NUM_SHARDS - 1))); do
    CUDA_VISIBLE_DEVICES=$i python main.py --model_name "$MODEL" --dataset "$DATASET" --HWdes "$HWDES" \
      --sample_num 0 --cycle 3 --batch_size 256 --shard "$i/$NUM_SHARDS" \
      --log_file "results/$MODEL/${DATASET}_accsim.shard$i.log" &
  done
  wait
fi
