#!/usr/bin/env bash
# The CUDA entry of the replay catalogue (checks/replays.toml: cuda-turbo-set-rows-block128) on a lent CUDA machine
# that has no git and no network, in ONE device call of at most 10 minutes. Run from the root of the checkout that
# travels (the harness code), with the fork's two commits carried as exported sources:
#   .devcarry/rc/   written here by `turbo-harness replay-export cuda-turbo-set-rows-block128 --out .devcarry/rc`
#                   (two <commit>.tar.xz of about 4.5 MB, the tree without docs/models/media/benches, and
#                   replay-sources.json with each one's SHA-256, checked before unpacking)
# What it does (docs/replay-cuda.md has the device calls):
#   run [WAIT]      start `catalogue ENTRY --one-tree` in the background (setsid): it unpacks both commits, builds the
#                   parent's ggml + CUDA backend (CUDA_ARCH=90) in one source tree, replays PQ5 there, syncs the tree to
#                   the fix (one file differs: ggml-cuda/set-rows.cu), rebuilds that file, replays again; waits up to
#                   WAIT s (default 540), then collects
#   collect [WAIT]  wait up to WAIT s (default 540) for a run started before, then put its results into $OUT:
#                   catalogue.log, record.json (catalogue --json: verdicts, evidence, build wall/CPU seconds),
#                   reports.tgz (both replay reports), build logs; call it at once if `run` ran out of time (the
#                   machine stays warm 30 s after a call and the background run goes on)
# The replay cache and reports live outside the checkout (/root/rc-cache, /root/rc-reports), so carrying the code
# again does not remove them.
set -u
PHASE=${1:-run}; WAIT=${2:-540}
ENTRY=${ENTRY:-cuda-turbo-set-rows-block128}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_ARCH=${CUDA_ARCH:-90} GGML_NO_BACKTRACE=1
export TURBO_REPLAY_CACHE=/root/rc-cache TURBO_REPORTS=/root/rc-reports
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/rc-cache /root/rc-reports
SRC=${SRC:-$PWD/.devcarry/rc}
LOG=/root/rc-catalogue.log
T0=$(date +%s)
collect() {
  while [ ! -f /root/rc.done ] && [ $(( $(date +%s) - T0 )) -lt "$1" ]; do sleep 5; done
  [ -f /root/rc.done ] && echo "catalogue finished after $(( $(date +%s) - T0 )) s of this call" \
    || echo "catalogue still running after $(( $(date +%s) - T0 )) s: call '$0 collect' again at once"
  uptime
  tail -n 2 /root/rc-cache/tree-*/build/turbo-harness-build.log 2>/dev/null | cut -c1-300  # the build's last steps
  cp "$LOG" "$OUT/catalogue.log" 2>/dev/null
  cp /root/rc-record.json "$OUT/record.json" 2>/dev/null
  for b in /root/rc-cache/tree-*/build; do  # the build logs (configure + compile), one per flavour
    [ -f "$b/turbo-harness-build.log" ] && tail -c 2000000 "$b/turbo-harness-build.log" > "$OUT/$(basename "$(dirname "$b")").log"
  done
  ls /root/rc-reports >/dev/null 2>&1 && tar -czf "$OUT/reports.tgz" -C /root rc-reports
  cat "$LOG" 2>/dev/null | cut -c1-400
  [ -f /root/rc.done ]
}
case "$PHASE" in
  run)
    nvidia-smi -L; nproc; python3 --version; command -v nvcc cmake ninja ccache
    [ -f "$SRC/replay-sources.json" ] || { echo "no sources at $SRC: carry .devcarry/rc (replay-export)" >&2; exit 2; }
    if [ ! -f /root/rc.done ] && ! pgrep -f "harness.cli catalogue $ENTRY" >/dev/null; then
      rm -f /root/rc.done
      setsid bash -c "python3 -m harness.cli catalogue $ENTRY --fork-dir '$SRC' --one-tree --json /root/rc-record.json \
        > $LOG 2>&1; echo rc=\$? >> $LOG; touch /root/rc.done" < /dev/null > /dev/null 2>&1 &
      sleep 2
    fi
    collect "$WAIT" ;;
  collect)
    collect "$WAIT" ;;
  *) echo "unknown phase $PHASE: run [WAIT] | collect [WAIT]" >&2; exit 2 ;;
esac
