#!/usr/bin/env bash
# The cross-backend sample (CPU vs CUDA, `turbo-harness sweep --backends cpu,cuda`) on a lent CUDA machine, in
# phases that fit the device tool's calls. Run from the root of the checkout that travels. The code is the tree itself
# (or a copy in .devcarry/xb/); the rest travels in ignored folders carried one per call:
#   .devcarry/c1/  the fork snapshot (llama-cpp-turboquant-*.tar.xz + README.md with its sha256), wiki.test.raw and
#                  the first model pieces;   other .devcarry/*/  smol.part* / gemma.part* (+ smol.sha256, gemma.sha256)
# Each call carries at most 64 MiB with the tracked tree. With reports/samples the tree is over that (66 MiB on
# 2026-12-07), so the calls are made from a local branch whose one commit drops reports/samples (1.6 MiB left): then
# pieces of 20 MiB (split -b 20M -d), three per call, carry SmolLM2 (94 MiB) and Gemma 3 (241 MiB) in 6 calls.
# The machine goes back 30 s after a call returns: chain the calls, and wait inside a call (WAIT), never between.
# Device time seen on 2026-12-07 (H100): start about 200 s, each failed start 90-100 s, the CUDA build about 230 s,
# the carry calls 4 s each, `verify --target cuda` 60 s; the two sweeps did not finish in 8 min when run at once.
# The build and the sweeps' job cache live outside the checkout (/root/xbuild, /root/xcache), so carrying the code
# again does not remove them. Phases:
#   build          unpack the fork, start the CUDA build (llama-perplexity; TARGETS=ggml,test-backend-ops for verify
#                  alone: then only .done-verify marks it done, and the sweep phases keep waiting for .done) in the background, return
#   sweep NAME     (NAME smol | gemma) wait for the build, join NAME's pieces, start the sweep in the background
#   collect NAME [WAIT]   wait up to WAIT s for NAME's sweep, then its report folder and log into $OUT
#   run NAME [WAIT]       sweep then collect, in one call
#   sweeps [WAIT]        both models one after the other (never two sweeps at once: their CPU runs fight for the cores)
#   verify [WAIT]         wait for the build, then `verify --target cuda`, timed, its report into $OUT (VNAME names
#                         it; TURBO_BACKEND_OPS_JOBS=1 gives the one-process-at-a-time baseline)
set -u
PHASE=${1:-build}; NAME=${2:-smol}; WAIT=${3:-540}
XB=${XB:-$PWD/.devcarry/xb}; [ -d "$XB/harness" ] || XB=$PWD   # the code: carried copy, else the tree itself
export PYTHONPATH=$XB:/root/xfork/llama.cpp/gguf-py PYTHONUNBUFFERED=1 CUDA_ARCH=${CUDA_ARCH:-90} GGML_NO_BACKTRACE=1
export TURBO_BUILD_ROOT=/root/xbuild TURBO_SWEEP_CACHE=/root/xcache FORK_DIR=/root/xfork/llama.cpp
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
PAIRS=f16/f16,q8_0/q8_0,q4_0/q4_0,q4_0/q4_0+rot,turbo4/turbo4,turbo3/turbo3,q8_0/turbo3,turbo3/q8_0
waitfor() { while [ ! -f "$1" ] && [ $(( $(date +%s) - T0 )) -lt "$2" ]; do sleep 5; done; [ -f "$1" ]; }
case "$PHASE" in
  build)
    nvidia-smi -L; nproc; pwd; ls .devcarry
    [ -d "$FORK_DIR" ] || python3 -m harness.fork.snapshot .devcarry/c1/llama-cpp-turboquant-*.tar.xz --dest /root/xfork || exit 2
    mkdir -p /root/xbuild
    if [ ! -f /root/xbuild/.done ] && ! pgrep -f "harness.cli build" >/dev/null; then
      setsid bash -c "python3 -m harness.cli build --backend cuda --targets ${TARGETS:-ggml,llama-perplexity,test-backend-ops} > /root/xbuild.log 2>&1 \
        && touch /root/xbuild/.done-verify \$( [ -z '${TARGETS:-}' ] && echo /root/xbuild/.done ); echo rc=\$? >> /root/xbuild.log" \
        < /dev/null > /dev/null 2>&1 &
    fi
    sleep 5; tail -3 /root/xbuild.log ;;
  sweep)
    waitfor /root/xbuild/.done "$WAIT" || { tail -5 /root/xbuild.log; echo "build not finished"; exit 3; }
    M=/root/$NAME.gguf
    [ -f "$M" ] || cat $(ls .devcarry/*/$NAME.part* | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2) > "$M"
    echo "$(cat .devcarry/*/$NAME.sha256 | head -n 1)  $M" | sha256sum -c - || { rm -f "$M"; exit 2; }
    rm -rf /tmp/xb-$NAME /root/xb-$NAME.done
    # the greedy-decode tool once, before two sweeps could compile it into the same build folder at the same time
    python3 -c "from harness.runners.decode import build_decode_tool as b; from pathlib import Path as P; print(b(P('/root/xbuild/cuda'), P('$FORK_DIR')))" || exit 3
    setsid bash -c "python3 -m harness.cli sweep --backends cpu,cuda --model $M --corpus .devcarry/c1/wiki.test.raw \
      --ctx 512 --chunks 4 --pairs $PAIRS --no-bench --kld-depths none --no-progress --out /tmp/xb-$NAME \
      > /root/xb-$NAME.log 2>&1; echo rc=\$? >> /root/xb-$NAME.log; touch /root/xb-$NAME.done" < /dev/null > /dev/null 2>&1 &
    sleep 3; echo "sweep $NAME started"; tail -3 /root/xb-$NAME.log ;;
  sweeps)  # both models, one after the other, in one background chain: two sweeps at once each ran llama-perplexity
    # with all 16 threads on the CPU side and both crawled (22 jobs in 8 min on an H100 machine, 2026-12-07)
    waitfor /root/xbuild/.done "$WAIT" || { tail -5 /root/xbuild.log; echo "build not finished"; exit 3; }
    for n in smol gemma; do
      M=/root/$n.gguf
      [ -f "$M" ] || cat $(ls .devcarry/*/$n.part* | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2) > "$M"
      echo "$(cat .devcarry/*/$n.sha256 | head -n 1)  $M" | sha256sum -c - || { rm -f "$M"; exit 2; }
      rm -rf /tmp/xb-$n /root/xb-$n.done
    done
    python3 -c "from harness.runners.decode import build_decode_tool as b; from pathlib import Path as P; print(b(P('/root/xbuild/cuda'), P('$FORK_DIR')))" || exit 3
    setsid bash -c "for n in smol gemma; do python3 -m harness.cli sweep --backends cpu,cuda --model /root/\$n.gguf \
      --corpus .devcarry/c1/wiki.test.raw --ctx 512 --chunks 4 --pairs $PAIRS --no-bench --kld-depths none --no-progress \
      --out /tmp/xb-\$n > /root/xb-\$n.log 2>&1; echo rc=\$? >> /root/xb-\$n.log; touch /root/xb-\$n.done; done" \
      < /dev/null > /dev/null 2>&1 &
    sleep 3; echo "sweeps started (smol, then gemma)" ;;
  run)  # sweep in the foreground (wait for the build first), then its report into $OUT: one call instead of two
    "$0" sweep "$NAME" "$WAIT" && "$0" collect "$NAME" 600 ;;
  verify)  # wait for the build, then `verify --target cuda` timed (#23: per-check times), its report into $OUT
    waitfor /root/xbuild/.done-verify "$WAIT" || { tail -5 /root/xbuild.log; echo "build not finished"; exit 3; }
    S=$(date +%s); uptime
    V=${VNAME:-xb-verify}; mkdir -p "$OUT"; rm -rf /tmp/$V
    python3 -m harness.cli verify --target cuda --out /tmp/$V 2>&1 | tee "$OUT/$V.log"
    echo "verify wall $(( $(date +%s) - S )) s (TURBO_BACKEND_OPS_JOBS=${TURBO_BACKEND_OPS_JOBS:-default})"; uptime
    tar -czf "$OUT/$V.tgz" -C /tmp $V ;;
  collect)
    waitfor /root/xb-$NAME.done "$WAIT" && echo "sweep $NAME done" || echo "sweep $NAME still running"
    cp /root/xb-$NAME.log "$OUT/" 2>/dev/null; tail -40 /root/xb-$NAME.log
    [ -d /tmp/xb-$NAME ] && tar -czf "$OUT/xb-$NAME.tgz" -C /tmp xb-$NAME ;;
  *) echo "unknown phase $PHASE: build | sweep NAME | collect NAME [WAIT]" >&2; exit 2 ;;
esac
