"""Benchmark (prints figures; not a test): KVREAL's wall time per model on the built fork.

For each model (default: every model of checks/models.toml that is installed) it runs
``turbo-harness check KVREAL --model NAME`` as a user would, and prints the process wall time, the
check's own duration and its capture/analysis split (from the run's notes), and the CPU seconds the run used
(user + system, all threads): wall time on a shared machine moves with its load, CPU time much less.

usage: python scripts/bench_kvreal.py [MODEL ...]   (report folders go to build/bench-kvreal-<model>)
"""
from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    from harness.runners import models
    names = argv or list(models.known_models())
    for name in names:
        out = ROOT / "build" / f"bench-kvreal-{Path(name).stem}"
        t0 = time.time()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([sys.executable, "-m", "harness.cli", "check", "KVREAL", "--model", name, "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # less sensitive to a busy machine
        try:
            run = json.loads((out / "run.json").read_text())
        except (OSError, ValueError):
            print(f"{name:10s} no report (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-200:]}")
            continue
        chk = next(c for c in run["checks"] if c["id"] == "KVREAL")
        split = next((n for n in chk["notes"] if n.startswith("wall time")), "")
        skip = next((c["caveat"] for c in chk["cells"] if c["verdict"] == "SKIP"), "")
        print(f"{name:10s} KVREAL {chk['verdict']:7s} process {wall:6.1f} s wall ({cpu:6.1f} s CPU), check {chk['duration_s']:6.1f} s"
              + (f"; {re.sub('^wall time: ', '', split)}" if split else "") + (f"; skipped: {skip}" if skip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
