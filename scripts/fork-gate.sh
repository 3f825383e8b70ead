#!/usr/bin/env bash
# The turbo-harness gate for a fork's CI (docs/ci.md): build the fork, verify it against the known findings, compare
# the run with the last accepted one, and fail the job on a finding that is not accepted or on anything worse.
#
#   scripts/fork-gate.sh [build|verify|diff|gate|all]     (default: all four in turn)
#
# Environment (paths may be relative to the folder it is started in):
#   FORK_DIR       the fork checkout (required for build and verify)
#   REPORT_DIR     where this run's report goes (default reports/ci-run); verify starts it fresh
#   ACCEPTED_DIR   the last accepted run (a REPORT_DIR of an earlier job, e.g. downloaded as an artifact); when it
#                  holds no run.json the diff step says so and passes (the first run has nothing to compare with),
#                  unless REQUIRE_ACCEPTED=1: then a missing accepted run (a wrong path, a failed download) fails
#                  the gate with exit 2 instead of passing every time
#   KNOWN          known-findings file (default: checks/known-findings.toml of the harness; '' for none)
#   FAIL_ON        diff's --fail-on: worse (default) | changed | never
#   TURBO_BUILD_ROOT  build folder root (default build/ of the harness); BACKEND  backend to build (default: detect)
#   TURBO_HARNESS  the turbo-harness command (default: the harness's .venv/bin/turbo-harness)
#   VERIFY_ARGS    extra verify options (e.g. "--target cuda"); BUILD_ARGS extra build options (e.g. "--rpc")
# Exit codes: build/verify/diff steps return 0 so that later steps (uploads) still run; `gate` (and `all`) exit 1 when
# verify's known-findings gate failed or diff found something worse, 2 when verify could not measure or bad input.
set -uo pipefail
HARNESS=$(cd "$(dirname "$0")/.." && pwd)
TH=${TURBO_HARNESS:-$HARNESS/.venv/bin/turbo-harness}
REPORT_DIR=${REPORT_DIR:-reports/ci-run}
ACCEPTED_DIR=${ACCEPTED_DIR:-reports/accepted}
KNOWN=${KNOWN-$HARNESS/checks/known-findings.toml}
FAIL_ON=${FAIL_ON:-worse}
STATE=${REPORT_DIR%/}.gate  # exit codes of the steps, read by `gate` (beside the report, not inside it)

need_fork() {
  if [ -z "${FORK_DIR:-}" ]; then echo "error: FORK_DIR is not set: point it at the fork checkout" >&2; exit 2; fi
}

step_build() {
  need_fork
  # shellcheck disable=SC2086
  $TH build --fork-dir "$FORK_DIR" --targets ggml,test-backend-ops ${BACKEND:+--backend "$BACKEND"} ${BUILD_ARGS:-}
  local rc=$?
  mkdir -p "$STATE" && echo $rc > "$STATE/build"
  [ $rc = 0 ] || echo "fork-gate: the build failed (exit $rc): see the message above" >&2
  return 0
}

step_verify() {
  need_fork
  rm -rf "$REPORT_DIR"  # a fresh report: never merged with an earlier job's
  # shellcheck disable=SC2086
  $TH verify --fork-dir "$FORK_DIR" --out "$REPORT_DIR" ${KNOWN:+--known "$KNOWN"} ${VERIFY_ARGS:-}
  local rc=$?
  mkdir -p "$STATE" && echo $rc > "$STATE/verify"
  echo "fork-gate: verify exit $rc (0 every finding accepted, 1 a new, grown or fixed one, 2 could not measure)"
  return 0
}

step_diff() {
  if [ ! -f "$ACCEPTED_DIR/run.json" ]; then
    if [ "${REQUIRE_ACCEPTED:-0}" = 1 ]; then
      echo "fork-gate: no accepted run in $ACCEPTED_DIR although REQUIRE_ACCEPTED=1: fix the path or the artifact download" >&2
      mkdir -p "$STATE" && echo 2 > "$STATE/diff"
      return 0
    fi
    echo "fork-gate: no accepted run in $ACCEPTED_DIR: nothing to compare with (accept this run to start the history)"
    mkdir -p "$STATE" && echo 0 > "$STATE/diff"
    return 0
  fi
  $TH diff "$ACCEPTED_DIR" "$REPORT_DIR" --out "$REPORT_DIR/diff" --fail-on "$FAIL_ON"
  local rc=$?
  mkdir -p "$STATE" && echo $rc > "$STATE/diff"
  return 0
}

step_gate() {
  local worst=0 s rc
  for s in build verify diff; do
    rc=$(cat "$STATE/$s" 2>/dev/null || echo missing)
    echo "fork-gate: $s -> $rc"
    case "$rc" in
      0) ;;
      1) [ $worst = 2 ] || worst=1 ;;
      missing) [ "$s" = build ] || worst=2 ;;  # a job may build in a step of its own
      *) worst=2 ;;
    esac
  done
  echo "fork-gate: exit $worst"
  exit $worst
}

case "${1:-all}" in
  build) step_build ;;
  verify) step_verify ;;
  diff) step_diff ;;
  gate) step_gate ;;
  all) step_build; step_verify; step_diff; step_gate ;;
  *) echo "error: unknown step '$1': use build, verify, diff, gate or all" >&2; exit 2 ;;
esac
