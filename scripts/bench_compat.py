#!/usr/bin/env python3
"""COMPAT's wall time and probe calls, local CPU and CPU + rpc0 (loopback rpc-server), for this tree or another one
(prints figures; not a test). Issue 23: COMPAT's cost on a GPU is per call, not per byte.

Each run is a fresh process that runs PQ1-PQ6 then COMPAT on the fork (as ``verify`` does: COMPAT reuses their
observations) and reports COMPAT's duration and the probe calls it made (counted at the client, so a tree without
the counters counts too). ``--src`` measures another checkout of the harness (e.g. ``git worktree add /tmp/base
main``) with its own ``--build-root`` (a folder whose ``cpu/`` links to the build's files but has its own
``turbo-probe/``, so the two trees' probes do not replace each other); runs of the trees alternate. Medians, with the
load average before each run.

Usage: python scripts/bench_compat.py [--reps 3] [--no-rpc] [--src DIR --build-root DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE = r'''
import collections, json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, os.getcwd())
from harness.fork import build as fb
from harness.fork.probe import Probe
from harness.targets.fork import ForkTarget
from harness.verify import run_checks
calls, before = collections.Counter(), {}
orig = Probe.call
def call(self, method, *a):
    calls[method] += 1
    return orig(self, method, *a)
Probe.call = call
def log(s):
    if s.startswith("PQ6"):
        before.update(calls)
bdir, fork = fb.find_build("cpu"), fb.fork_dir()
def go(target):
    with tempfile.TemporaryDirectory() as d:
        run = run_checks(target, ["PQ1", "PQ2", "PQ3", "PQ4", "PQ5", "PQ6", "COMPAT"], ["turbo2", "turbo3", "turbo4"],
                         Path(d), target_backend="cpu", log=log)
    c = run.checks[-1]
    print(json.dumps({"s": c.duration_s, "verdict": c.verdict.value,
                      "calls": {m: n - before.get(m, 0) for m, n in calls.items() if n - before.get(m, 0)}}))
if sys.argv[1] == "rpc":
    from harness.runners.rpc_server import RpcServer
    with RpcServer(fb.binary(bdir, "rpc-server"), log_path=Path(tempfile.gettempdir()) / "bench-compat-rpc.log") as srv:
        t = ForkTarget(bdir, fork, rpc=[srv.endpoint], rpc_servers={srv.endpoint: srv})
        go(t)
        t.close()
else:
    t = ForkTarget(bdir, fork)
    go(t)
    t.close()
'''


def one(src: Path, build_root: str | None, mode: str) -> dict:
    """One COMPAT measurement of the tree ``src`` in a fresh process: {'s', 'verdict', 'calls', 'load'}."""
    env = dict(os.environ, PYTHONPATH=str(src))
    if build_root:
        env["TURBO_BUILD_ROOT"] = build_root
    load = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", ONE, mode], cwd=src, env=env, capture_output=True, text=True)
    line = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0 or not line.startswith("{"):
        raise SystemExit(f"error: the run in {src} failed: {(r.stderr or r.stdout).strip()[-600:]}")
    return {**json.loads(line), "load": load}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-rpc", action="store_true", help="local CPU only (no rpc-server)")
    ap.add_argument("--src", help="another checkout of the harness to measure beside this one")
    ap.add_argument("--build-root", help="TURBO_BUILD_ROOT for --src (its own turbo-probe/)")
    a = ap.parse_args(argv)
    trees = [("this tree", ROOT, None)] + ([("--src", Path(a.src).resolve(), a.build_root)] if a.src else [])
    modes = ["cpu"] + ([] if a.no_rpc else ["rpc"])
    res: dict = {}
    for _ in range(a.reps):
        for mode in modes:
            for name, src, broot in trees:
                r = one(src, broot, mode)
                res.setdefault((name, mode), []).append(r)
                print(f"  {name:9s} {mode:3s} COMPAT {r['s']:5.2f} s ({r['verdict']}), {sum(r['calls'].values())} probe "
                      f"calls {r['calls']}, load {r['load']:.2f}", flush=True)
    print(f"\n| tree | backends | COMPAT s (median of {a.reps}) | probe calls | load (min-max) |\n|---|---|---|---|---|")
    for (name, mode), rs in res.items():
        loads = [r["load"] for r in rs]
        print(f"| {name} | {'cpu' if mode == 'cpu' else 'cpu + rpc0 (loopback)'} | {statistics.median(r['s'] for r in rs):.2f} "
              f"| {sum(rs[0]['calls'].values())} | {min(loads):.1f}-{max(loads):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
