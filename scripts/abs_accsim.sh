#!/usr/bin/env bash
# Non-slicing absolute accuracy: error injection (wrap_error.py) against the bit-and-crossbar ground
# truth of main.py, with the speedup measured in the same run.
#   bash scripts/abs_accsim.sh                          # smallcnn on mnist5k, the default search space
#   MODEL=resnet18 DATASET=cifar10 bash scripts/abs_accsim.sh --device cuda
#   METHOD=published bash scripts/abs_accsim.sh         # SPEC section 7 as written (needs stat.py)
# The ground truth (main.py, full grid, 3 chips) is made first when its records are missing; extra
# arguments go to wrap_error.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
HWDES=${HWDES:-HW_config/Search_space.ini}
CYCLE=${CYCLE:-3}
METHOD=${METHOD:-calibrated}
TIME_POINTS=${TIME_POINTS:-5}
mkdir -p "results/$MODEL"
if [ ! -s "results/$MODEL/${DATASET}_accsim.jsonl" ]; then
  python main.py --model_name "$MODEL" --dataset "$DATASET" --HWdes "$HWDES" --sample_num 0 --cycle "$CYCLE" \
    --batch_size 256 --log_file "results/$MODEL/${DATASET}_accsim.log"
fi
if [ "$METHOD" = "published" ] && [ ! -s "results/stats/${MODEL}_${DATASET}.json" ]; then
  python stat.py --model_name "$MODEL" --dataset "$DATASET" --HWdes "$HWDES"
fi
python wrap_error.py --model_name "$MODEL" --dataset "$DATASET" --cycle "$CYCLE" --method "$METHOD" \
  --time_points "$TIME_POINTS" --log_file "results/$MODEL/${DATASET}_wrap.log" "$@"
