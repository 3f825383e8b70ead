"""Benchmark (prints figures; not a test): the harness's own cost in a model-level sweep, and KVREAL's wall time.

    python scripts/bench_sweep.py [--model gemma3] [--kvreal smollm2,gemma3] [SWEEP OPTIONS...]
    make bench-sweep                      # the default Gemma 3 CPU sweep, fresh, and KVREAL on both models

1. Runs ``turbo-harness sweep --model MODEL`` with an empty job cache (``build/bench-sweep/cache``), so that every
   tool call really runs, and measures the whole command's wall time.
2. Sums the fork binaries' own run times: every tool call's wall time as recorded in its evidence file
   (``evidence/<pair>/*.cmd``: ``# rc=0 after 27.5 s``; llama-perplexity, llama-bench and the greedy-decode tool).
3. Prints wall time, tool time, harness overhead (wall - tools) and its share (goal <= 5%).
4. Times ``turbo-harness check KVREAL --model M`` for each model of ``--kvreal``.

Extra arguments are passed to the sweep (e.g. ``--no-bench``). Exit code: 0 when the overhead is within 5%, 1 when
not, 2 when a command failed to produce its report.
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


def tool_seconds(run_dir: Path) -> tuple[float, int]:
    """(sum of the tool calls' wall times in seconds, number of calls) from the ``*.cmd`` evidence files of a sweep
    report folder (each ends with ``# rc=N after S s`` or ``# timed out after S s``). A run that the report lists
    twice (the depth table's run at the main context is the main run: ``depth256-ppl.cmd`` = ``ppl.cmd``) counts once."""
    total, n, seen = 0.0, 0, set()
    for f in sorted(run_dir.rglob("*.cmd")):  # a cross-backend report: <backend>/evidence/... and evidence/cross/...
        text = f.read_text()
        m = re.search(r"after ([\d.]+) s", text)
        if m and text not in seen:
            seen.add(text)
            total += float(m.group(1))
            n += 1
    return total, n


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
    print(f"sweep --model {args.model}: exit {r.returncode}, {meta.get('jobs_run')} jobs run, {meta.get('jobs_cached')} cached")
    print(f"  wall time of the command      {wall:8.1f} s")
    print(f"  fork binaries' own run times  {tools:8.1f} s  ({n} tool calls, from evidence/*/*.cmd)")
    print(f"  harness overhead              {over:8.1f} s  = {100 * over / wall:.1f}% of the wall time (goal <= {100 * GOAL:g}%)")
    mp = meta.get("model_passes")
    if mp:  # a cross-backend sweep: llama-perplexity passes against the bound of issue 20
        pairs = len(json.loads((report / "run.json").read_text())["sections"]["xbackend"]["rows"]) // max(
            len(meta.get("backends", [])) - 1, 1)
        bound = mp["sweeps"] + pairs * (len(meta["backends"]) - 1)
        total = mp["sweeps"] + mp["logits"] + mp["scoring"]
        print(f"  model passes (llama-perplexity) {total:6d}  = {mp['sweeps']} in the per-backend sweeps + "
              f"{mp['logits']} reference logits runs + {mp['scoring']} cross scoring runs")
        print(f"  bound: per-backend sweeps + one scoring pass per pair = {bound}: "
              f"{'within' if total <= bound else f'{total - bound} over (the reference logits runs: llama-perplexity cannot save logits while it scores)'}")
    ok = over <= GOAL * wall
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
