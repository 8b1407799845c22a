#!/usr/bin/env bash
# Ground-truth sweep of one model: the original's command line. Several shards: one process each, records
# merge by themselves.
#   bash scripts/run.sh                       # one process (a GPU when one is visible, else the CPU)
#   NUM_SHARDS=4 bash scripts/run.sh          # GPUs visible: one shard per GPU (--device cuda), at most
#                                             # one per GPU; none: 4 CPU shards of one thread each
#   DEVICE=cpu NUM_SHARDS=2 bash scripts/run.sh   # CPU shards even where GPUs are visible
# One sweep runs on one kind of device (main.py refuses records of another), so GPU and CPU shards never
# mix. Exits non-zero when any shard fails.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smallcnn}
DATASET=${DATASET:-mnist5k}
HWDES=${HWDES:-HW_config/Search_space.ini}
NUM_SHARDS=${NUM_SHARDS:-1}
DEVICE=${DEVICE:-auto}
mkdir -p "results/$MODEL"
ARGS=(--model_name "$MODEL" --dataset "$DATASET" --HWdes "$HWDES" --sample_num 0 --cycle 3 --batch_size 256)
if [ "$NUM_SHARDS" -eq 1 ]; then
  exec python main.py "${ARGS[@]}" --device "$DEVICE" --log_file "results/$MODEL/${DATASET}_accsim.log"
fi

# The visible GPUs, as CUDA_VISIBLE_DEVICES names them (or 0..n-1).
gpus=()
if [ "$DEVICE" != cpu ]; then
  count=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
    gpus=("${gpus[@]:0:$count}")
  else
    for ((g = 0; g < count; g++)); do gpus+=("$g"); done
  fi
fi
if [ "$DEVICE" = cuda ] && [ "${#gpus[@]}" -eq 0 ]; then
  echo "run.sh: DEVICE=cuda but no GPU is visible to PyTorch" >&2
  exit 2
fi
if [ "${#gpus[@]}" -gt 0 ] && [ "$NUM_SHARDS" -gt "${#gpus[@]}" ]; then
  echo "run.sh: NUM_SHARDS=$NUM_SHARDS but ${#gpus[@]} GPU(s) visible: run at most one shard per GPU" \
       "(the rest would run on the CPU, and a sweep does not mix devices), or DEVICE=cpu" >&2
  exit 2
fi

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < NUM_SHARDS; i++)); do
  log="results/$MODEL/${DATASET}_accsim.shard$i.log"
  if [ "${#gpus[@]}" -gt 0 ]; then
    CUDA_VISIBLE_DEVICES=${gpus[$i]} python main.py "${ARGS[@]}" --device cuda --shard "$i/$NUM_SHARDS" \
      --log_file "$log" &
  else  # CPU shards share the cores: one thread each instead of every shard using all of them
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 python main.py "${ARGS[@]}" --device cpu --shard "$i/$NUM_SHARDS" \
      --log_file "$log" &
  fi
  pids+=("$!")
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "shard $i/$NUM_SHARDS done"
  else
    code=$?
    echo "run.sh: shard $i/$NUM_SHARDS failed (exit $code); see results/$MODEL/${DATASET}_accsim.shard$i.log" >&2
    failed=1
  fi
done
exit "$failed"
