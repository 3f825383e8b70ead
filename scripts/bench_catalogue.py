"""Speed of the replay catalogue (issue 23: cold <= 20 min, warm <= 3 min; prints figures, not a test).

Cold: an empty ccache (a private CCACHE_DIR) and an empty replay cache, so every commit is exported and compiled;
warm: the same again, every build reused. Each run's console output is shown as it comes, then one line per build
(commit, compiler, wall seconds, CPU seconds of the compilers) and the totals, with the machine load beside them.
The CPU seconds do not depend on the load: on an idle machine of N cores a build cannot take less wall time than
its CPU seconds / N (less parallel steps, such as configure and links, add to that).

    python scripts/bench_catalogue.py [--dir DIR] [--warm-only] [--fork-dir HISTORY] [IDS...]
    python scripts/bench_catalogue.py --summary DIR/cold.json     # the figures of a record written before
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summary(record: Path) -> str:
    """The build table and totals of a `catalogue --json` record."""
    d = json.loads(Path(record).read_text())
    lines, builds = [], []
    for e in d["entries"]:
        for side in ("parent", "fix_side"):
            s = e[side]
            if s.get("build_seconds") is not None:
                builds.append(s)
                lines.append(f"  {e['id']:34s} {side.replace('_side', ''):6s} {s['commit'][:10]} {s.get('compiler') or '':7s} "
                             f"{s['build_seconds']:7.0f} s wall {s.get('build_cpu_seconds') or 0:7.0f} CPU-s")
    cpu = sum(b.get("build_cpu_seconds") or 0 for b in builds)
    wall = sum(b["build_seconds"] for b in builds)
    cores = d.get("machine", {}).get("cpus") or os.cpu_count()
    sides = [e[s] for e in d["entries"] for s in ("parent", "fix_side")]
    checks = sum(s["seconds"] for s in sides) - wall
    lines.append(f"{Path(record).name}: {len(d['entries'])} entries in {d['seconds']:.0f} s ({d['seconds'] / 60:.1f} min), "
                 f"all verdicts as catalogued: {d['all_match']}; {len(builds)} builds: {wall:.0f} s wall, {cpu:.0f} CPU-s "
                 f"(/ {cores} cores = {cpu / cores / 60:.1f} min); checks and exports {checks:.0f} s; "
                 f"load {d['load_start'][0]:.1f} at the start, {d['load_end'][0]:.1f} at the end")
    return "\n".join(lines)


def run(name: str, work: Path, args, extra_env: dict) -> Path:
    rec = work / f"{name}.json"
    env = dict(os.environ, **extra_env)
    cmd = [sys.executable, "-m", "harness.cli", "catalogue", "--json", str(rec), *args]
    print(f"== {name}: {' '.join(cmd)} (load {os.getloadavg()[0]:.1f})", flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    print(f"== {name}: exit {rc}, {time.time() - t0:.0f} s wall, load {os.getloadavg()[0]:.1f} now", flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*", help="catalogue ids (default: every replayed cpu entry)")
    ap.add_argument("--dir", default=str(ROOT / ".cache" / "bench-catalogue"), help="work folder (emptied for the cold run)")
    ap.add_argument("--warm-only", action="store_true", help="reuse the work folder's caches: the warm run alone")
    ap.add_argument("--fork-dir", default=None, help="the fork's git history (default $FORK_DIR)")
    ap.add_argument("--summary", default=None, help="print the figures of this record and stop")
    a = ap.parse_args()
    if a.summary:
        print(summary(Path(a.summary)))
        return 0
    work = Path(a.dir).resolve()
    if not a.warm_only:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {"CCACHE_DIR": str(work / "ccache"), "TURBO_REPLAY_CACHE": str(work / "replay"),
           "TURBO_REPORTS": str(work / "reports"), "PYTHONPATH": str(ROOT)}
    args = list(a.ids) + (["--fork-dir", a.fork_dir] if a.fork_dir else [])
    recs = [] if a.warm_only else [run("cold", work, args, env)]
    recs.append(run("warm", work, args, env))
    print("\nbuilds (cold run):" if not a.warm_only else "\nwarm run:")
    for r in recs:
        if r.is_file():
            print(summary(r))
    print("goals (issue 23): cold <= 20 min, warm <= 3 min, every entry as catalogued; say the load beside them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
