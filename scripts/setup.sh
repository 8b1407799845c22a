#!/usr/bin/env bash
# Creates .venv (if missing) and installs nipa with its test tools into it.
# PyTorch is pinned to the CPU build first so that no dependency pulls a CUDA build;
# on a GPU machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".[test]"
