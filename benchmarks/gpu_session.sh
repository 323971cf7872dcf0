#!/usr/bin/env bash
# The GPU figures in one short, prepared run on a lent GPU machine (issues 7 and 11), stage by stage:
#   OUT=some/folder bash benchmarks/gpu_session.sh                  # default stages: smoke preset fp32
#   STAGES="smoke gpu preset" OUT=... bash benchmarks/gpu_session.sh
# Stages (logs land in $OUT, default benchmarks/results, one file each):
#   smoke   benchmarks/gpu.py --tiny and 3 s of the shakespeare-gpu recipe on a small model, so that a broken
#           CUDA path stops the run in seconds instead of after minutes (a failed smoke stops everything);
#   gpu     bash benchmarks/gpu.sh: issue 7's throughput figures (about 1 minute);
#   preset  python benchmarks/quality.py --preset shakespeare-gpu --minutes $MINUTES (issue 11's GPU target,
#           <= 1.38 nats within 3 minutes; about 3.6 minutes of wall time with evaluations and checkpoints);
#   fp32    the same with --set precision=fp32: torch's autocast runs cuDNN's LSTM in float16 without loss
#           scaling (docs/quality.md), and this says what float32 LSTM layers cost and give;
#   tm      python benchmarks/quality.py --preset tm-gpu --minutes ${TM_MINUTES:-5} (no target; about 6 minutes).
# The defaults fit one call of under 10 minutes on an H100. On 2026-11-27 an earlier version of this script
# (commit 32fe915: smoke, gpu, the first shakespeare-gpu recipe, one variant) gave the figures committed then.
# A dry run on a CPU: QUALITY_SET="device=cpu num_hiddens=64" MINUTES=0.1 bash benchmarks/gpu_session.sh
# The C++ CPU kernels are not built there (DEEPRNN_NATIVE=0): a GPU run never uses them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results}"
STAGES="${STAGES:-smoke preset fp32}"
MINUTES="${MINUTES:-2.4}"
read -r -a extra <<< "${QUALITY_SET:-}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DEEPRNN_NATIVE=0 MPLBACKEND=Agg
day=$(date +%Y-%m-%d)
stamp() { echo "== $(date +%H:%M:%S) $*"; }

quality() {  # quality LOG PRESET MINUTES [KEY=VALUE ...]
  local log=$1 preset=$2 minutes=$3
  shift 3
  local sets=("$@" "${extra[@]}")
  timeout 420 "$PYTHON" benchmarks/quality.py --preset "$preset" --minutes "$minutes" \
    ${sets[@]:+--set "${sets[@]}"} 2>&1 | tee "$log" | grep -v "^  sample:"
}

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0], "gpu", torch.cuda.is_available())' || exit 1

for stage in $STAGES; do
  stamp "$stage"
  case $stage in
    smoke)
      timeout 120 "$PYTHON" -m benchmarks.gpu --tiny --no-save > "$OUT/smoke.log" 2>&1 \
        && timeout 120 "$PYTHON" benchmarks/quality.py --preset shakespeare-gpu --minutes 0.05 --eval-every 20 \
             --set num_hiddens=128 batch_size=16 num_steps=50 "${extra[@]}" >> "$OUT/smoke.log" 2>&1
      rc=$?
      tail -5 "$OUT/smoke.log"
      if [ $rc -ne 0 ]; then stamp "smoke failed (rc $rc): stopping"; tail -40 "$OUT/smoke.log"; exit $rc; fi ;;
    gpu)
      PYTHON="$PYTHON" bash benchmarks/gpu.sh --no-save 2>&1 | tee "$OUT/gpu-$day.txt" ;;
    preset)
      quality "$OUT/quality-shakespeare-gpu-$day.txt" shakespeare-gpu "$MINUTES" ;;
    fp32)
      quality "$OUT/quality-shakespeare-gpu-fp32-$day.txt" shakespeare-gpu "$MINUTES" precision=fp32 ;;
    tm)
      quality "$OUT/quality-tm-gpu-$day.txt" tm-gpu "${TM_MINUTES:-5}" ;;
    *)
      stamp "unknown stage $stage (smoke, gpu, preset, fp32, tm)"; exit 2 ;;
  esac
done
stamp "done"
