#!/usr/bin/env python3
"""Speed of checks over ggml RPC on loopback vs local (prints figures; not a test). `make bench-rpc`.

Starts the fork's rpc-server (CPU backend, 127.0.0.1) and measures, on the same machine:
1. single probe calls on the local CPU device and on rpc0 (the same CPU backend behind the server), for a
   growing number of 128-value rows: quantise (set_rows), decode (cpy to f32) and flash attention over n KV rows.
   Both sides run the same ggml CPU code with the same threads, so the difference is what RPC adds: sending
   the inputs, reading the outputs back, and the protocol (connection, hello, buffer allocation, graph
   serialisation); dividing the bytes moved by it gives the effective loopback rate.
2. COMPAT for one type at growing ``COMPAT.rows``, local CPU only vs CPU + rpc0, with the time spent in calls
   on each device and in the harness's own analysis (NumPy: reference quantiser, diffs, exact attention).

Usage: python scripts/bench_rpc.py [--rows 1024,8192,65536] [--compat-rows 2048,8192,32768] [--type turbo3]
Needs a build with RPC (`make build RPC=1`; FORK_DIR / TURBO_BUILD_ROOT as for the other commands).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.checks.common import load_thresholds  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.fork import build as fb  # noqa: E402
from harness.runners.rpc_server import RpcServer  # noqa: E402
from harness.targets.fork import ForkTarget  # noqa: E402
from harness.verify import run_checks  # noqa: E402


def _median_s(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def calls(target: ForkTarget, t: str, rows: list[int], reps: int) -> None:
    """Table 1: per-call times local vs rpc0 and what RPC adds."""
    rb = target.probe.row_bytes(t, 128)
    print(f"\n## 1. One probe call, local CPU vs rpc0 (same CPU backend behind rpc-server on 127.0.0.1), {t}, "
          f"median of {reps}\n")
    print("| call | rows | bytes sent + received | local ms | rpc0 ms | RPC adds ms | RPC share | effective MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    for n in [1, *rows]:
        x = rng.standard_normal((n, 128)).astype(np.float32)
        raw = target.quantize("cpu", "set_rows", t, x)
        q = rng.standard_normal((4, 1, 128)).astype(np.float32)
        cases = [
            ("set_rows", n * 128 * 4 + n * 8 + n * rb,
             lambda b: target.quantize(b, "set_rows", t, x)),
            ("cpy decode", n * rb + n * 128 * 4,
             lambda b: target.decode(b, "cpy", t, raw, n, 128)),
            ("flash_attn", 2 * n * rb + q.nbytes + n * 2 + 4 * 128 * 4,
             lambda b: target.flash_attn(b, t, raw, t, raw, q, 128, 128, n, 1, 1 / np.sqrt(128), True, True)),
        ]
        for name, nbytes, fn in cases:
            fn("cpu"), fn("rpc0")  # warm both (worker, connection, first allocation)
            lo, re = _median_s(lambda: fn("cpu"), reps), _median_s(lambda: fn("rpc0"), reps)
            add = re - lo
            rate = f"{nbytes / add / 1e6:.0f}" if add > 1e-4 and n > 1 else "-"
            print(f"| {name} | {n} | {nbytes / 1e6:.2f} MB | {lo * 1e3:.1f} | {re * 1e3:.1f} | {add * 1e3:.1f} | "
                  f"{add / re:.0%} | {rate} |")


class Timed:
    """Wraps a target's calls to add up the seconds spent per backend."""

    def __init__(self, target: ForkTarget):
        self.t, self.spent, self.calls = target, defaultdict(float), defaultdict(int)
        for name in ("quantize", "decode", "wht", "flash_attn", "quantize_many", "flash_attn_many"):  # a batch: one call
            setattr(self, name, self._wrap(getattr(target, name)))

    def _wrap(self, fn):
        def run(backend, *a, **k):
            t0 = time.perf_counter()
            try:
                return fn(backend, *a, **k)
            finally:
                side = "rpc0" if backend.startswith("rpc") else "cpu"
                self.spent[side] += time.perf_counter() - t0
                self.calls[side] += 1
        return run

    def __getattr__(self, name):
        return getattr(self.t, name)


def _compat_once(target: ForkTarget, t: str, th: dict, backends: list[str]) -> tuple[float, dict, dict]:
    tt = Timed(target)
    tt.layouts = target.layouts
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run = run_checks(tt, ["COMPAT"], [t], Path(d), target_backend="cpu", backends=backends, thresholds=th,
                         log=lambda s: None)
        wall = time.perf_counter() - t0
    assert run.checks[0].verdict.value == "PASS", run.checks[0].verdict
    return wall, dict(tt.spent), dict(tt.calls)


def compat(target: ForkTarget, t: str, rows: list[int], reps: int = 3) -> None:
    """Table 2: COMPAT wall time local vs with rpc0, split into device calls and the harness's analysis
    (median of ``reps`` runs each, after one warm-up run)."""
    print(f"\n## 2. COMPAT ({t}), local CPU only vs CPU + rpc0, by COMPAT.rows (rows of 128 values), median of {reps}\n")
    print("| rows | values | local s | CPU + rpc0 s | in cpu calls s | in rpc0 calls s (calls) | harness analysis s | rpc0 share |")
    print("|---|---|---|---|---|---|---|---|")
    th = load_thresholds()
    th["COMPAT"]["rows"] = rows[0]
    _compat_once(target, t, th, ["cpu", "rpc0"])  # warm-up: probe worker, connections, first allocations
    for n in rows:
        th["COMPAT"]["rows"] = n
        local = statistics.median(_compat_once(target, t, th, ["cpu"])[0] for _ in range(reps))
        runs = sorted((_compat_once(target, t, th, ["cpu", "rpc0"]) for _ in range(reps)), key=lambda r: r[0])
        wr, sp, nc = runs[len(runs) // 2]
        other = wr - sp.get("cpu", 0) - sp.get("rpc0", 0)
        print(f"| {n} | 2^{np.log2(n * 128):.0f} | {local:.2f} | {wr:.2f} | {sp.get('cpu', 0):.2f} | "
              f"{sp.get('rpc0', 0):.2f} ({nc.get('rpc0', 0)}) | {other:.2f} | {sp.get('rpc0', 0) / wr:.0%} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1024,8192,65536")
    ap.add_argument("--compat-rows", default="2048,8192,32768")
    ap.add_argument("--type", default="turbo3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--build", default="cpu", help="build folder backend (default cpu)")
    a = ap.parse_args(argv)
    try:
        rows, compat_rows = _counts(a.rows, "--rows"), _counts(a.compat_rows, "--compat-rows")
        if a.reps < 1:
            raise HarnessError(f"--reps {a.reps}: give 1 or more repetitions (default 5)")
        bdir, fork = fb.find_build(a.build), fb.fork_dir()
        if not fb.has_rpc(bdir):
            raise HarnessError(f"{bdir} has no RPC backend: `make build RPC=1`")
        with RpcServer(fb.binary(bdir, "rpc-server"), log_path=bdir / "rpc-server-logs" / "bench.log") as srv:
            target = ForkTarget(bdir, fork, rpc=[srv.endpoint], rpc_servers={srv.endpoint: srv})
            try:
                print(f"rpc-server {srv.endpoint} ({', '.join(srv.served_devices())}); build {bdir}")
                calls(target, a.type, rows, a.reps)
                compat(target, a.type, compat_rows)
            finally:
                target.close()
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _counts(value: str, option: str) -> list[int]:
    """A comma-separated list of row counts, each a whole number >= 1.

    Raises:
        HarnessError: an empty list or an entry that is not a positive whole number (one line with the fix).
    """
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise HarnessError(f"{option} {value!r}: give row counts of 1 or more, comma-separated, e.g. {option} 1024,8192")
    return out


if __name__ == "__main__":
    sys.exit(main())
