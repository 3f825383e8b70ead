"""Speed of the source audit and of the Metal shim (prints figures; not a test; run by `make bench`).

Figures: the AUDIT scan of every backend source of the fork (goal <= 2 s), the first compile of the Metal shim into
an empty cache (goal <= 60 s on 2 cores) and its load from the cache afterwards, and one metal-src round trip
(set_rows + dequant of 2^20 values of turbo4). The fork is $FORK_DIR (or the harness's default checkout).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.fork import build as fb  # noqa: E402
from harness.fork import metal_src as M  # noqa: E402
from harness.fork import source_audit as A  # noqa: E402


def main() -> int:
    fork = fb.fork_dir()
    t0, c0 = time.perf_counter(), time.process_time()
    tabs = A.scan(fork)
    scan_s, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"audit scan: {scan_s:.2f} s wall ({scan_cpu:.2f} s CPU; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores) for {len(tabs)} tables in {len(A.source_files(fork))} backend sources (goal <= 2 s)")
    if M.metal_source(fork) is None:
        print("metal shim: the fork has no Metal source")
        return 0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        first = M.MetalSource(fork, cache=Path(d))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = M.MetalSource(fork, cache=Path(d))
        cached_s = time.perf_counter() - t0
        print(f"metal shim: first compile {compile_s:.1f} s (goal <= 60 s on {os.cpu_count()} cores), "
              f"from the cache {cached_s:.2f} s (compiled again: {again.compiled_now}; first: {first.compiled_now})")
        x = np.random.default_rng(0).standard_normal((8192, 128)).astype(np.float32)
        t0 = time.perf_counter()
        raw = again.set_rows("turbo4", x)
        again.dequant("turbo4", "dequant", raw, x.size)
        print(f"metal-src round trip (set_rows + dequant, 2^20 turbo4 values): {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
