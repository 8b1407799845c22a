#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests "$@"
