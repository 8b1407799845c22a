#!/usr/bin/env bash
# The main job on the embedded default, the whole pipeline: train the small CNN on the offline MNIST
# digits, simulate a small sample of the default search space on crossbars (ground truth), compute the
# bit statistics and NIPA's correlation with that ground truth (validate.py writes the scatter plot
# results/$MODEL/${DATASET}_nipa.png), run the fast estimate against it (wrap_error.py, with its speedup
# measured in the same run), then print a short summary. SAMPLE_NUM=0 CYCLE=3 runs the full 90-point grid
# (about 40 minutes on a 2-core CPU with NIPA_COMPILE=1).
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
python stat.py --model_name "$MODEL" --dataset "$DATASET" --HWdes HW_config/Search_space.ini
python validate.py --model_name "$MODEL" --dataset "$DATASET"
python wrap_error.py --model_name "$MODEL" --dataset "$DATASET" --cycle 3 --log_file "results/$MODEL/${DATASET}_wrap.log"
python -m nipa.results.pipeline_summary --model_name "$MODEL" --dataset "$DATASET"
