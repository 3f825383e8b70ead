"""Benchmark (prints figures; not a test): the harness's own cost in a model-level sweep, and KVREAL's wall time.

    python scripts/bench_sweep.py [--model gemma3] [--kvreal smollm2,gemma3] [SWEEP OPTIONS...]
    make bench-sweep                      # the default Gemma 3 CPU sweep, fresh, and KVREAL on both models

1. Runs ``turbo-harness sweep --model MODEL`` with an empty job cache (``build/bench-sweep/cache``), so that every
   tool call really runs, and measures the whole command's wall time.
2. Sums the fork binaries' own run times: every tool call's wall time as recorded in its evidence file
   (``evidence/<pair>/*.cmd``: ``# rc=0 after 27.5 s``; llama-perplexity, llama-bench and the greedy-decode tool).
3. Prints wall time, tool time, harness overhead (wall - tools) and its share (goal <= 5%).
   With ``--backends A,B`` (a cross-backend sweep, issue 20): counts the llama-perplexity calls in the evidence and
   prints them against the bound "the per-backend sweeps plus one scoring pass per pair": with M backends and N
   pairs, M x (1 + N) (+ the depth tables' own runs) + (M - 1) x N.
4. Times ``turbo-harness check KVREAL --model M`` for each model of ``--kvreal``.

Extra arguments are passed to the sweep (e.g. ``--no-bench``). Exit code: 0 when the overhead is within 5% (and a
cross-backend sweep's passes within the bound), 1 when not, 2 when a command failed to produce its report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.05  # issue 13, acceptance 6: harness overhead <= 5% of the sweep's wall time


def tool_calls(run_dir: Path) -> list[tuple[str, float]]:
    """[(tool name, wall seconds)] of every tool call in the ``*.cmd`` evidence files of a sweep report folder (each
    ends with ``# rc=N after S s`` or ``# timed out after S s``). A run that the report lists twice (the depth
    table's run at the main context is the main run: ``depth256-ppl.cmd`` = ``ppl.cmd``; a cross-backend report's
    evidence/cross/ copies) counts once."""
    out, seen = [], set()
    for f in sorted(run_dir.rglob("*.cmd")):  # a cross-backend report: <backend>/evidence/... and evidence/cross/...
        text = f.read_text()
        m = re.search(r"after ([\d.]+) s", text)
        if m and text not in seen:
            seen.add(text)
            tool = next((Path(w).name for w in text.split() if "=" not in w), "?")
            out.append((tool, float(m.group(1))))
    return out


def tool_seconds(run_dir: Path) -> tuple[float, int]:
    """(sum of the tool calls' wall times in seconds, number of calls): see :func:`tool_calls`."""
    calls = tool_calls(run_dir)
    return sum(s for _, s in calls), len(calls)


def n_ppl_depth(run_dir: Path) -> int:
    """Distinct llama-perplexity calls of the depth tables (``depth<d>-*.cmd`` not also a main run's)."""
    main = {f.read_text() for f in run_dir.rglob("*.cmd") if not f.name.startswith("depth")}
    return len({f.read_text() for f in run_dir.rglob("depth*.cmd")} - main)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--kvreal", default="smollm2,gemma3", help="models for the KVREAL timing ('' = none)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-sweep")
    ap.add_argument("--backends", default="", help="a cross-backend sweep (e.g. cpu,rpc0: a loopback rpc-server with "
                    "1 thread is started for rpc0 unless --rpc is given)")
    args, extra = ap.parse_known_args(argv)
    srv = None
    if args.backends:
        extra = ["--backends", args.backends, *extra]
        if "rpc0" in args.backends and "--rpc" not in extra:
            from harness.fork.build import build_dir
            from harness.runners.rpc_server import RpcServer
            srv = RpcServer(build_dir("cpu") / "bin" / "rpc-server", threads=1,
                            log_path=args.out.parent / "bench-rpc-server.log").start()
            extra += ["--rpc", srv.endpoint]
    try:
        return _bench(args, extra)
    finally:
        if srv is not None:
            srv.stop()


def _bench(args, extra: list[str]) -> int:
    th = [sys.executable, "-m", "harness.cli"]
    shutil.rmtree(args.out, ignore_errors=True)
    env = dict(os.environ, TURBO_SWEEP_CACHE=str(args.out / "cache"))
    report = args.out / f"sweep-{args.model}"
    cmd = th + ["sweep", "--model", args.model, "--no-progress", "--out", str(report), *extra]
    print("$", " ".join(cmd[2:]), f"(job cache {env['TURBO_SWEEP_CACHE']}, empty)", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not (report / "run.json").is_file():
        print(f"the sweep wrote no report (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        return 2
    meta = json.loads((report / "run.json").read_text())["meta"]
    tools, n = tool_seconds(report)
    over = wall - tools
    ok_passes = True
    load = os.getloadavg()
    print(f"sweep --model {args.model}: exit {r.returncode}, {meta.get('jobs_run')} jobs run, {meta.get('jobs_cached')} cached")
    print(f"  wall time of the command      {wall:8.1f} s")
    print(f"  fork binaries' own run times  {tools:8.1f} s  ({n} tool calls, from evidence/*/*.cmd)")
    print(f"  harness overhead              {over:8.1f} s  = {100 * over / wall:.1f}% of the wall time (goal <= {100 * GOAL:g}%)")
    ls, le = meta.get("load_start") or {}, meta.get("load_end") or {}
    print(f"  machine load (1 min)          {ls.get('load_1min', '?')} at start, {le.get('load_1min', '?')} at end, "
          f"{load[0]:.2f} now, on {os.cpu_count()} CPUs (a figure measured beside other work is not the harness's alone)")
    if meta.get("backends"):  # a cross-backend sweep: llama-perplexity passes against the bound of issue 20
        d = json.loads((report / "run.json").read_text())
        m_sides = len(meta["backends"])
        n_pairs = len(d["sections"]["xbackend"]["rows"]) // max(m_sides - 1, 1)
        n_ppl = len([t for t, _ in tool_calls(report) if t == "llama-perplexity"])
        depth = n_ppl_depth(report)
        bound = m_sides * (1 + n_pairs) + depth + (m_sides - 1) * n_pairs
        mp = meta.get("model_passes") or {}
        print(f"  model passes (llama-perplexity calls in the evidence) {n_ppl}; the harness counted "
              f"{mp.get('sweeps', '?')} in the per-backend sweeps + {mp.get('scoring', '?')} cross scoring runs")
        print(f"  bound: {m_sides} per-backend sweeps of {n_pairs} pairs ({m_sides} x (1 + {n_pairs})"
              f"{f' + {depth} depth runs' if depth else ''}) + one scoring pass per pair and compared backend "
              f"({m_sides - 1} x {n_pairs}) = {bound}: {'within' if n_ppl <= bound else f'{n_ppl - bound} OVER'}")
        if n_ppl > bound:
            ok_passes = False
    ok = over <= GOAL * wall and ok_passes
    for m in [x for x in args.kvreal.split(",") if x.strip()]:
        out = args.out / f"kvreal-{m}"
        t0 = time.perf_counter()
        r = subprocess.run(th + ["check", "KVREAL", "--model", m, "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True)
        w = time.perf_counter() - t0
        try:
            d = json.loads((out / "run.json").read_text())
            chk = next(c for c in d["checks"] if c["id"] == "KVREAL")
            print(f"KVREAL --model {m}: {w:.1f} s wall (check {chk['duration_s']:.1f} s), verdict {chk['verdict']}, exit {r.returncode}")
        except (OSError, ValueError, StopIteration, KeyError):
            print(f"KVREAL --model {m}: no report (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
