#!/usr/bin/env bash
# Run the harness on a lent CUDA machine (no network), in phases that fit the device tool's calls.
# Everything travels in the ignored folder .devcarry/ (each call carries one part of it; the machine keeps
# ignored files between calls while it is warm):
#   .devcarry/c1/  the fork snapshot (llama-cpp-turboquant-*.tar.xz + README.md with its sha256),
#                  wiki.test.raw, model.part00
#   .devcarry/m2/  model.part01        .devcarry/m3/  model.part02 + model.sha256
# A call carries at most 64 MiB including the tracked tree (about 28 MB with the samples): keep each folder
# under about 35 MB (split -b 25M -d model.gguf model.part); the sweep phase joins every model.part* it finds.
# Usage (repo root there):
#   scripts/device-cuda.sh build  [WAIT]   unpack the fork, start the CUDA build in the background, wait up to WAIT s
#   scripts/device-cuda.sh verify [WAIT]   wait for the build, then `verify --target cuda` into $OUT
#   scripts/device-cuda.sh sweep  [ARGS]   join the model pieces, then a CUDA sweep into $OUT
#   scripts/device-cuda.sh rpc    [WAIT]   COMPAT with the CUDA device behind the build's rpc-server on 127.0.0.1
#                                          (CPU x RPC(CUDA), --target rpc0), then the direct CUDA COMPAT (CPU x CUDA,
#                                          --target cuda), and the cell-by-cell comparison, into $OUT
# The build phase builds with --rpc (ggml's RPC backend and rpc-server), so the rpc phase needs no rebuild (it adds
# them to an older build). The machine goes back 30 s after a call: run `rpc` right after `build` (the CUDA build
# took 324 s on an H200 here; COMPAT twice about 2-4 min).
set -u
PHASE=${1:-build}; shift || true
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_ARCH=${CUDA_ARCH:-90} GGML_NO_BACKTRACE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
SNAP=$(ls .devcarry/c1/llama-cpp-turboquant-*.tar.xz 2>/dev/null | head -n 1)
export FORK_DIR=$PWD/.devcarry/fork/llama.cpp
export PYTHONPATH=$PYTHONPATH:$FORK_DIR/gguf-py   # the fork ships the gguf package; pip has no network there
wait_build() {
  while [ ! -f build/cuda/.harness-built ] && [ $(( $(date +%s) - T0 )) -lt "$1" ]; do
    grep -q "^rc=" build/cuda-build.log 2>/dev/null && break
    sleep 10
  done
  tail -3 build/cuda-build.log 2>/dev/null
  [ -f build/cuda/.harness-built ]
}
case "$PHASE" in
  build)
    nvidia-smi -L; nproc
    [ -d "$FORK_DIR" ] || FORK_DIR=$(python3 -m harness.fork.snapshot "$SNAP" --dest .devcarry/fork) || exit 2
    mkdir -p build/cuda
    if [ ! -f build/cuda/.harness-built ] && ! pgrep -f "harness.cli build" >/dev/null; then
      setsid bash -c "python3 -m harness.cli build --backend cuda --rpc --targets ggml,test-backend-ops,llama-perplexity,llama-bench \
        > build/cuda-build.log 2>&1 && touch build/cuda/.harness-built; echo rc=\$? >> build/cuda-build.log" &
      sleep 2
    fi
    wait_build "${1:-540}" && echo "build done after $(( $(date +%s) - T0 )) s" || echo "build still running after $(( $(date +%s) - T0 )) s"
    cp build/cuda-build.log "$OUT/" 2>/dev/null ;;
  verify)
    wait_build "${1:-500}" || { echo "build not finished"; exit 3; }
    python3 -m harness.cli verify --target cuda --build cuda --out /tmp/cuda-run 2>&1 | tee "$OUT/verify.log"
    echo "verify took $(( $(date +%s) - T0 )) s"
    tar -czf "$OUT/cuda-run.tgz" -C /tmp cuda-run ;;
  sweep)
    # the pieces (split -b 25M -d model.gguf model.part) may lie in any carried folder: joined in name order
    [ -f .devcarry/model.gguf ] || cat $(ls .devcarry/*/model.part* | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2) > .devcarry/model.gguf
    echo "$(cat .devcarry/*/model.sha256 | head -n 1)  .devcarry/model.gguf" | sha256sum -c - || exit 2
    python3 -m harness.cli sweep --backend cuda --model .devcarry/model.gguf --corpus .devcarry/c1/wiki.test.raw \
      --no-progress --out /tmp/cuda-sweep "$@" 2>&1 | tee "$OUT/sweep.log"
    echo "sweep took $(( $(date +%s) - T0 )) s"
    tar -czf "$OUT/cuda-sweep.tgz" -C /tmp cuda-sweep ;;
  rpc)
    wait_build "${1:-500}" || { echo "build not finished"; exit 3; }
    if [ ! -x build/cuda/bin/rpc-server ]; then  # a build from before --rpc: add ggml RPC and rpc-server (incremental)
      python3 -m harness.cli build --backend cuda --rpc --targets ggml,rpc-server 2>&1 | tail -2 | tee "$OUT/rpc-build.log"
    fi
    TYPES=${TYPES:-turbo2,turbo3,turbo4}
    # the harness starts build/cuda/bin/rpc-server -H 127.0.0.1 -d CUDA0 itself (--rpc-local), reads its log and
    # restarts it when an op the CUDA backend lacks aborts it (over RPC every op is "supported")
    python3 -m harness.cli check COMPAT --build cuda --type "$TYPES" --rpc-local CUDA0 --backend cpu --backend rpc0 \
      --target rpc0 --out /tmp/cuda-rpc-run 2>&1 | tee "$OUT/rpc-compat.log"
    python3 -m harness.cli check COMPAT --build cuda --type "$TYPES" --backend cpu --backend cuda --target cuda \
      --out /tmp/cuda-direct-run 2>&1 | tee "$OUT/direct-compat.log"
    python3 scripts/rpc_compare.py /tmp/cuda-direct-run /tmp/cuda-rpc-run --as cuda --remote rpc0 | tee "$OUT/rpc-vs-direct.md"
    cp build/cuda/rpc-server-logs/rpc-server.log "$OUT/" 2>/dev/null
    echo "rpc phase took $(( $(date +%s) - T0 )) s"
    tar -czf "$OUT/cuda-rpc-runs.tgz" -C /tmp cuda-rpc-run cuda-direct-run ;;
  *) echo "unknown phase $PHASE: build | verify | sweep | rpc" >&2; exit 2 ;;
esac
