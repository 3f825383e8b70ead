#!/usr/bin/env python3
"""Speed of `turbo-harness diff` and `turbo-harness scorecard` on existing runs (prints figures; not a test).

Goals (issue 21): diff of two full verify runs <= 1 s; scorecard of N runs <= 1 s + 0.1 s x N. Each figure is the
median of --reps wall times of the command as a user runs it (a new process: interpreter start, imports, reading
run.json, writing every output format), and, beside it, the same work in this process (no start-up).

Usage: .venv/bin/python scripts/bench_diff.py [--base RUN] [--new RUN] [--runs RUN ...] [--n 1,3,10] [--reps 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "reports" / "samples"


def wall(cmd: list[str], reps: int) -> float:
    """Median wall time (s) of ``cmd`` over ``reps`` runs; exit codes 0/1 are results, anything else a failure."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        ts.append(time.perf_counter() - t0)
        if r.returncode not in (0, 1):
            sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return statistics.median(ts)


def in_process(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(SAMPLES / "cpu-verify"), help="BASE run (a full verify run)")
    ap.add_argument("--new", default=str(SAMPLES / "cuda-h200"), help="NEW run (a full verify run)")
    ap.add_argument("--runs", nargs="*", default=None, help="runs for the scorecard (default: the verify samples)")
    ap.add_argument("--n", default="1,3,10,30", help="numbers of runs to score (copies of --runs when more are asked)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from harness.pipeline import load_run
    from harness.report.diff import diff_runs
    from harness.report.diff_render import write_diff
    from harness.report.scorecard import load_scorecard
    from harness.report.scorecard_render import write_scorecard

    th = [sys.executable, "-m", "harness.cli"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-diff-"))
    try:
        cells = sum(len(c.cells) for c in load_run(Path(a.base)).checks), sum(len(c.cells) for c in load_run(Path(a.new)).checks)
        t_cli = wall([*th, "diff", a.base, a.new, "--out", str(tmp / "d"), "--fail-on", "never"], a.reps)
        t_in = in_process(lambda: write_diff(diff_runs(load_run(Path(a.base)), load_run(Path(a.new)), a.base, a.new),
                                             tmp / "d2"), a.reps)
        print(f"diff {Path(a.base).name} ({cells[0]} cells) vs {Path(a.new).name} ({cells[1]} cells): "
              f"{t_cli:.3f} s as a command, {t_in:.3f} s in process (goal <= 1 s): {'OK' if t_cli <= 1.0 else 'OVER'}")
        runs = a.runs or [str(p.parent) for p in sorted(SAMPLES.glob("*/run.json"))  # verify reports only: scorecard
                          if not {c.id for c in load_run(p.parent).checks} & {"SWEEP", "XBACKEND"}]  # refuses sweeps
        pool = tmp / "runs"
        for n in [int(x) for x in a.n.split(",")]:
            dirs = []
            for i in range(n):  # copies of the runs (run.json only) when more are asked than given
                src = Path(runs[i % len(runs)])
                dst = pool / f"{n}-{i}"
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / "run.json", dst / "run.json")
                dirs.append(str(dst))
            t_cli = wall([*th, "scorecard", *dirs, "--out", str(tmp / f"sc{n}")], a.reps)
            t_in = in_process(lambda: write_scorecard(load_scorecard([Path(d) for d in dirs]), tmp / f"sc{n}b"), a.reps)
            goal = 1.0 + 0.1 * n
            print(f"scorecard of {n} runs: {t_cli:.3f} s as a command, {t_in:.3f} s in process "
                  f"(goal <= {goal:.1f} s): {'OK' if t_cli <= goal else 'OVER'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
