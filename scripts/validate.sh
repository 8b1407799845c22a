#!/usr/bin/env bash
# NIPA against the ground truth of main.py (scripts/run.sh): correlations, scatter plot, points CSV.
# Needs the records (scripts/run.sh) and the statistics (scripts/stat.sh).
#   bash scripts/validate.sh
#   MODEL=resnet18 DATASET=cifar10 COLOR_BY=ADCprecision bash scripts/validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
COLOR_BY=${COLOR_BY:-wl_weight}
# The published metric, with the per-layer sensitivity ranking...
python validate.py --model_name "$MODEL" --dataset "$DATASET" --color_by "$COLOR_BY" --per_layer "$@"
# ...the variants, written under their own file names for comparison; the device term of the cell
# model also measures every crossbar layer's noise (loads the checkpoint; about 1 s per point and chip
# for smallcnn): how well NIPA predicts the simulated layers, apart from the accuracy's noise.
python validate.py --model_name "$MODEL" --dataset "$DATASET" --color_by "$COLOR_BY" --tile_factor one "$@"
python validate.py --model_name "$MODEL" --dataset "$DATASET" --color_by "$COLOR_BY" --reduction layer_sum "$@"
python validate.py --model_name "$MODEL" --dataset "$DATASET" --color_by "$COLOR_BY" --device_model cells \
    --layer_noise "$@"
