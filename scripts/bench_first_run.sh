#!/usr/bin/env bash
# The newcomer's path to a first verdict, timed (issue 23; prints figures, not a test): from `git clone` of this
# repository, following the README only (no FORK_DIR, no network besides the package index), each stage's wall time
# with the machine load (uptime's 1-minute average) at its start and end:
#   clone -> make install -> make verify (the fork found and built, the report written) -> make test (what the fork
#   tests need prepared, then the suite with -rs)
#
# usage: scripts/bench_first_run.sh [--cold] [--no-test] [DEST]
#   DEST     where to clone (default: turbo-first-run beside this repository, so that ../shared/forks is found the
#            way a clone beside the project's shared folder finds it); removed first.
#   --cold   an empty private ccache (CCACHE_DIR=DEST/.ccache): the build compiles everything, as on a new machine.
#   --no-test  stop after make verify.
# Goal: make verify to a report <= 6 min wall at load <= 2; make test with every fork test running.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
COLD=0 TEST=1 DEST=
for a in "$@"; do
  case "$a" in
    --cold) COLD=1 ;;
    --no-test) TEST=0 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) DEST=$a ;;
  esac
done
DEST=${DEST:-$(dirname "$REPO")/turbo-first-run}
LOG=${LOG:-$REPO/build/first-run-$(date -u +%Y%m%d-%H%M%S).log}
mkdir -p "$(dirname "$LOG")"
load() { cut -d' ' -f1 /proc/loadavg; }
declare -a SUMMARY
T_ALL=$(date +%s)

# run one stage: name, then the command (run in DEST after the clone); its output goes to the log
stage() {
  local name=$1; shift
  local l0 t0 rc t l1
  l0=$(load); t0=$(date +%s)
  echo "== $name: started $(date -u +%H:%M:%S), load $l0" | tee -a "$LOG"
  ( "$@" ) >>"$LOG" 2>&1
  rc=$?
  t=$(( $(date +%s) - t0 )); l1=$(load)
  local line
  line=$(printf '%-14s %5d s  (load %s at start, %s at end)  exit %d' "$name" "$t" "$l0" "$l1" "$rc")
  echo "   $line" | tee -a "$LOG"
  SUMMARY+=("$line")
  return $rc
}

rm -rf "$DEST"
unset FORK_DIR TURBO_BUILD_ROOT TURBO_REQUIRE_FORK BACKEND
[ "$COLD" = 1 ] && export CCACHE_DIR=$DEST.ccache && rm -rf "$CCACHE_DIR"
echo "first run of $REPO -> $DEST (log $LOG); $(nproc) cores; ccache $([ $COLD = 1 ] && echo 'empty (--cold)' || echo 'as it is') (${CCACHE_DIR:-default folder})" | tee "$LOG"

stage clone git clone -q "$REPO" "$DEST" || exit 1
cd "$DEST" || exit 1
stage install make install || exit 1
stage verify make verify
grep -E "^(PASS|PARTIAL|FAIL|ERROR|SKIP)|^report:|building|fork:" "$LOG" | tail -12
if [ "$TEST" = 1 ]; then
  stage test make test
  grep -E "passed|failed|SKIPPED" "$LOG" | tail -25
fi
echo "== summary ($(( $(date +%s) - T_ALL )) s in all; $(nproc) cores)" | tee -a "$LOG"
for s in "${SUMMARY[@]}"; do echo "   $s" | tee -a "$LOG"; done
command -v ccache >/dev/null && ccache -s 2>/dev/null | grep -E "Hits|Misses" | head -2 | sed 's/^/   ccache /' | tee -a "$LOG"
