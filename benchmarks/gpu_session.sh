#!/usr/bin/env bash
# Every GPU figure in one short, prepared run on a lent GPU machine (issues 7 and 11):
#   OUT=some/folder bash benchmarks/gpu_session.sh        # logs land in $OUT (default benchmarks/results)
# 1. smoke: benchmarks/gpu.py --tiny and 3 s of the shakespeare-gpu recipe on a small model, so that a
#    broken CUDA path stops the run in seconds instead of after minutes;
# 2. bash benchmarks/gpu.sh (issue 7's throughput figures);
# 3. python benchmarks/quality.py --preset shakespeare-gpu --minutes 2.4 (issue 11's GPU target: <= 1.38 nats
#    within 3 minutes);
# 4. one variant of it, picked from step 3's curve: more dropout when its best point came early (over-fitting),
#    a higher learning rate when it was still improving at the end.
# A dry run on a CPU: QUALITY_SET="device=cpu num_hiddens=64" MINUTES=0.1 bash benchmarks/gpu_session.sh
# The C++ CPU kernels are not built there (DEEPRNN_NATIVE=0): a GPU run never uses them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DEEPRNN_NATIVE=0 MPLBACKEND=Agg
day=$(date +%Y-%m-%d)
MINUTES="${MINUTES:-2.4}"
read -r -a extra <<< "${QUALITY_SET:-}"
stamp() { echo "== $(date +%H:%M:%S) $*"; }

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0], "gpu", torch.cuda.is_available())' || exit 1

stamp "smoke"
timeout 120 "$PYTHON" -m benchmarks.gpu --tiny --no-save > "$OUT/smoke.log" 2>&1 \
  && timeout 120 "$PYTHON" benchmarks/quality.py --preset shakespeare-gpu --minutes 0.05 --eval-every 20 \
       --set num_hiddens=128 batch_size=16 num_steps=50 "${extra[@]}" >> "$OUT/smoke.log" 2>&1
rc=$?
tail -5 "$OUT/smoke.log"
if [ $rc -ne 0 ]; then stamp "smoke failed (rc $rc): stopping"; tail -40 "$OUT/smoke.log"; exit $rc; fi

stamp "gpu.sh"
PYTHON="$PYTHON" bash benchmarks/gpu.sh 2>&1 | tee "$OUT/gpu-$day.txt"
cp benchmarks/results/gpu-"$day".txt "$OUT/gpu-$day-saved.txt" 2>/dev/null

stamp "shakespeare-gpu, $MINUTES minutes"
q="$OUT/quality-shakespeare-gpu-$day.txt"
timeout 330 "$PYTHON" benchmarks/quality.py --preset shakespeare-gpu --minutes "$MINUTES" \
  ${extra[@]:+--set "${extra[@]}"} 2>&1 | tee "$q"
best=$(grep -o 'at [0-9.]* min' "$q" | tail -1 | grep -o '[0-9.]*')
stamp "best point at ${best:-?} min"
if [ -z "$best" ]; then exit 1; fi
if awk "BEGIN{exit !($best < 0.8 * $MINUTES)}"; then
  variant=(dropout=0.55 output_dropout=0.6 weight_drop=0.6 embed_dropout=0.15)
else
  variant=(lr=3e-3)
fi
stamp "variant: ${variant[*]}"
timeout 330 "$PYTHON" benchmarks/quality.py --preset shakespeare-gpu --minutes "$MINUTES" --set "${variant[@]}" "${extra[@]}" 2>&1 \
  | tee "$OUT/quality-shakespeare-gpu-variant-$day.txt"
stamp "done"
