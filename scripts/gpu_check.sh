#!/usr/bin/env bash
# Run the GPU checks (benchmarks/gpu_check.py) from any directory; arguments are passed through.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$ROOT/benchmarks/gpu_check.py" "$@"
