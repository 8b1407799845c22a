#!/usr/bin/env bash
# The GPU figures and the GPU tests in one command, on any machine with a CUDA GPU and this project's
# environment (installs nothing, needs no network), in a few minutes:
#   bash bench/gpu.sh                  # GPU 0; GPU=1 bash bench/gpu.sh for another
# Writes under results/bench/:
#   simulator_cuda.json                bench/simulator.py --device cuda (SmallCNN batch 256, ResNet-18 batch 16,
#                                      with the exactness and oracle checks)
#   simulator_cuda_resnet18_b256.json  ResNet-18 at batch 256, plain vs sliced (simulator.py's worker mode)
#   fast_vs_sliced_cuda.json           bench/fast_vs_sliced.py --device cuda
#   gpu_tests.json (+ gpu_tests.xml)   pytest -k cuda: the device-fixture tests on the GPU
# Every step runs even if an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/bench}
GPU=${GPU:-0}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}  # seconds per step
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$GPU}
# Full float32 in cuBLAS and cuDNN, as every project script computes by default (nipa.runtime): the
# benchmarks do not import nipa.runtime, and cuDNN would otherwise use TF32 for the plain baseline too.
export NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-0}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU visible to PyTorch ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)' \
       2>/dev/null || echo "torch not importable"), CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); nothing run" >&2
  exit 2
fi
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, \
'| CUDA', torch.version.cuda)"

failed=()
step() {  # step NAME COMMAND...: run with a time limit, remember a failure, go on
  local name=$1
  shift
  echo "== $name: $*"
  local started=$SECONDS
  local run=(timeout "$STEP_TIMEOUT")
  if declare -F "$1" > /dev/null; then run=(); fi  # a function times its own commands
  if "${run[@]}" "$@"; then
    echo "== $name: ok ($((SECONDS - started)) s)"
  else
    echo "== $name: FAILED (exit $?, $((SECONDS - started)) s)" >&2
    failed+=("$name")
  fi
}

step simulator "$PYTHON" bench/simulator.py --device cuda --workloads smallcnn,resnet18 \
  --out "$OUT/simulator_cuda.json"

# simulator.py takes ResNet-18 at batch 16; the GPU goal is stated at batch 256: time plain and sliced
# there through its one-measurement worker mode (the same timing code, one JSON line per method).
resnet256() {
  local method
  for method in plain fast; do
    NIPA_COMPILE=1 timeout "$STEP_TIMEOUT" "$PYTHON" bench/simulator.py --worker resnet18 "$method" --batch 256 --device cuda \
      --repeats 3 --budget 60 | tail -n 1 > "$OUT/.resnet18_b256_$method.json" || return 1
  done
  "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {m: json.loads((out / f".resnet18_b256_{m}.json").read_text()) for m in ("plain", "fast")}
result = {"benchmark": "bench/simulator.py --worker resnet18 {plain,fast} --batch 256 --device cuda",
          "batch": 256, "runs": runs,
          "slowdown_fast_vs_plain": runs["fast"]["seconds"] / runs["plain"]["seconds"]}
(out / "simulator_cuda_resnet18_b256.json").write_text(json.dumps(result, indent=2) + "\n")
for m in runs:
    (out / f".resnet18_b256_{m}.json").unlink()
print(f"ResNet-18 batch 256: plain {runs['plain']['seconds']:.4f} s, sliced {runs['fast']['seconds']:.4f} s, "
      f"{result['slowdown_fast_vs_plain']:.1f}x")
EOF
}
step resnet18_b256 resnet256

step fast_vs_sliced "$PYTHON" bench/fast_vs_sliced.py --device cuda --out "$OUT/fast_vs_sliced_cuda.json"

gpu_tests() {
  local code=0
  timeout "$STEP_TIMEOUT" "$PYTHON" -m pytest tests -q -k cuda -rs --junitxml="$OUT/gpu_tests.xml" || code=$?
  "$PYTHON" - "$OUT" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
suite = ET.parse(out / "gpu_tests.xml").getroot()
suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
cases = []
for case in suite.iter("testcase"):
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0))})
summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
(out / "gpu_tests.json").write_text(json.dumps({"command": "pytest tests -k cuda", **summary,
                                                 "cases": cases}, indent=2) + "\n")
print(f"GPU tests: {summary}")
EOF
  return "$code"
}
step gpu_tests gpu_tests

if [ "${#failed[@]}" -gt 0 ]; then
  echo "bench/gpu.sh: failed steps: ${failed[*]}" >&2
  exit 1
fi
echo "bench/gpu.sh: all steps passed; JSON under $OUT/"
