#!/usr/bin/env bash
# The GPU figures of issue 7 in one run (< 5 minutes on one H100); see benchmarks/gpu.py.
#   bash benchmarks/gpu.sh [--tiny] [--seconds 4] [--no-graphs] [--no-save]
# Without CUDA it says that it fell back to CPU and runs tiny sizes in a few seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then PYTHON=.venv/bin/python; fi
"$PYTHON" -c 'import torch; print("nvidia-smi:"); import shutil, subprocess; smi = shutil.which("nvidia-smi"); print(subprocess.run([smi, "--query-gpu=name,clocks.max.sm,power.limit", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if smi else "  (none)")'
exec timeout 290 "$PYTHON" -m benchmarks.gpu "$@"
