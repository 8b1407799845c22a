#!/usr/bin/env bash
# What each fix changes: the ground truth of the default model on HW_config/Compat_space.ini with each
# --compat switch of the original tool alone, all of them (--compat original) and none (ours), then one
# table of mean top-1 over the chips (python -m nipa.results.compat_report). About 10 minutes on a 2-core CPU.
#   CYCLE=3 MODEL=smallcnn DATASET=mnist5k bash scripts/compat_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
CYCLE=${CYCLE:-3}
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
SPACE=HW_config/Compat_space.ini
OUT=results/$MODEL/compat
mkdir -p "$OUT"
files=()
for name in none per_read signed_cells original_slices original_faults digital_classifier original; do
  python main.py --model_name "$MODEL" --dataset "$DATASET" --HWdes "$SPACE" --sample_num 0 --cycle "$CYCLE" \
    --compat "$name" --out "$OUT/${DATASET}_compat-${name}_accsim.jsonl"
  files+=("$name=$OUT/${DATASET}_compat-${name}_accsim.jsonl")
done
python -m nipa.results.compat_report "${files[@]}" --out "$OUT/${DATASET}_compat_table.md"
