"""`make bench`: the whole `turbo-harness verify` wall time (process start to report written, as a user waits for it)
beside the checks' own times, and what the rest went to, with the machine load beside each figure.

Runs ``turbo-harness verify --checks AUDIT,PQ1..PQ6,COMPAT --out DIR`` as a child process (``--reps N`` runs, median),
then reads the checks' durations from the run's ``run.json``, and what each check cost in probe calls (its
``check_costs``: calls, seconds in them, per method; COMPAT's parts). Prints figures; it is not a test. Goal (issue 23):
whole verify <= 8 s wall at load <= 2 after the build, the six checks + COMPAT < 10 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = "AUDIT,PQ1,PQ2,PQ3,PQ4,PQ5,PQ6,COMPAT"


def load() -> str:
    """'load 1.23' (1-minute load average) for the line of a figure."""
    return f"load {os.getloadavg()[0]:.2f}"


def _children_cpu() -> float:
    """CPU seconds (user + system) of the waited-for child processes of this process so far."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def one_run(out: Path, extra: list[str]) -> tuple[float, dict, int, dict, float]:
    """(wall seconds from spawn to exit, {check id: seconds}, exit code, {check id: its check_costs}, CPU seconds of
    verify and everything it started: the probe worker, test-backend-ops) of one verify into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh report each time: --out never merges reports of different builds
    cmd = [sys.executable, "-m", "harness.cli", "verify", "--checks", CHECKS, "--out", str(out), *extra]
    t0, c0 = time.monotonic(), _children_cpu()
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, cpu = time.monotonic() - t0, _children_cpu() - c0
    f = out / "run.json"
    if not f.is_file():
        sys.stderr.write(r.stdout[-3000:])
        raise SystemExit(f"error: verify wrote no report ({out}): see its output above")
    d = json.loads(f.read_text())
    return wall, {c["id"]: c["duration_s"] for c in d["checks"]}, r.returncode, d["meta"].get("check_costs", {}), cpu


def calls_line(costs: dict) -> str:
    """'probe calls: PQ1 236 (0.7 s, 3.0 ms/call), ..., COMPAT 13 (2.4 s: 4 batches)' from a run's check_costs."""
    out = []
    for cid, c in costs.items():
        if not c.get("probe_calls"):
            continue
        batches = c.get("by_method", {}).get("batch", [0])[0]
        per = 1e3 * c["probe_s"] / c["probe_calls"]
        out.append(f"{cid} {c['probe_calls']} ({c['probe_s']:.1f} s, {per:.1f} ms/call"
                   + (f", {batches} of them batches" if batches else "") + ")")
    return "probe calls: " + (", ".join(out) or "none counted (not a fork target)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "bench-run"))
    ap.add_argument("--reps", type=int, default=1, help="runs (the median is printed beside each one)")
    a, extra = ap.parse_known_args(argv)
    walls, checks = [], []
    for i in range(a.reps):
        before = load()
        wall, t, rc, costs, cpu = one_run(Path(a.out), extra)
        s6 = sum(v for k, v in t.items() if k not in ("COMPAT", "AUDIT"))
        total = sum(t.values())
        walls.append(wall)
        checks.append(total)
        print("  ".join(f"{k} {v:.1f} s" for k, v in t.items()) + f"   ({before} before, {load()} after)")
        print(f"run {i + 1}: verify wall {wall:.1f} s (process start to report written, exit {rc}); checks' own "
              f"{total:.1f} s (six checks {s6:.1f} s + COMPAT {t.get('COMPAT', 0.0):.1f} s + AUDIT "
              f"{t.get('AUDIT', 0.0):.1f} s); the rest (start-up, "
              f"imports, reports, plots) {wall - total:.1f} s; CPU {cpu:.1f} s (verify and the processes it started: "
              f"less sensitive to other jobs than the wall time); {load()}")
        print(f"  {calls_line(costs)}")
        if "parts_s" in costs.get("COMPAT", {}):
            print("  COMPAT parts: " + ", ".join(f"{k} {v:.1f} s" for k, v in costs["COMPAT"]["parts_s"].items()))
    if a.reps > 1:
        print(f"median of {a.reps}: verify wall {statistics.median(walls):.1f} s, checks {statistics.median(checks):.1f} s; "
              f"{load()}")
    print("goal: verify wall <= 8 s at load <= 2 after the build; six checks + COMPAT < 10 s on 2 cores; all checks "
          "<= 15 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
