#!/usr/bin/env bash
# Run the harness on a lent CUDA machine (no network): build the carried fork copy for CUDA in the
# background (survives the call), wait up to WAIT seconds, then run `verify --target cuda` if built.
# Usage (from the repo root there): scripts/device-cuda.sh [WAIT]
set -u
WAIT=${1:-540}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_ARCH=${CUDA_ARCH:-90} FORK_DIR=$PWD/.devcarry/fork GGML_NO_BACKTRACE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ ! -f build/cuda/.harness-built ] && ! pgrep -f "harness.cli build" >/dev/null; then
  nvidia-smi -L
  setsid bash -c "python3 -m harness.cli build --backend cuda --targets ggml,test-backend-ops > build/cuda-build.log 2>&1 && touch build/cuda/.harness-built; echo rc=\$? >> build/cuda-build.log" &
  sleep 2
fi
while [ ! -f build/cuda/.harness-built ] && [ $(( $(date +%s) - T0 )) -lt "$WAIT" ]; do
  if grep -q "^rc=" build/cuda-build.log 2>/dev/null; then break; fi
  sleep 10
done
cp build/cuda-build.log "$OUT/" 2>/dev/null; tail -3 build/cuda/turbo-harness-build.log 2>/dev/null
if [ ! -f build/cuda/.harness-built ]; then echo "build not finished after $(( $(date +%s) - T0 )) s"; exit 3; fi
echo "build done; verify starts at $(( $(date +%s) - T0 )) s"
V0=$(date +%s)
python3 -m harness.cli verify --target cuda --build cuda --out /tmp/cuda-run 2>&1 | tee "$OUT/verify.log"
echo "verify took $(( $(date +%s) - V0 )) s"
tar -czf "$OUT/cuda-run.tgz" -C /tmp cuda-run
ls -la "$OUT"
