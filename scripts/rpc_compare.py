#!/usr/bin/env python3
"""Compare a COMPAT run over RPC with the direct run of the same backend, cell by cell.

Usage: python scripts/rpc_compare.py DIRECT_RUN RPC_RUN [--as cuda] [--remote rpc0]

Every cell of the RPC run whose path names the remote device (``rpc0``) is matched with the direct run's cell
of the same check, type and metric whose path names the backend instead (``cuda``); the table lists both
verdicts and values. Exit 0 when every matched verdict is the same and nothing is unmatched, else 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cells(run_dir: Path) -> list[dict]:
    """Cells of a run folder's run.json (check, type, path, metric, value, verdict, caveat)."""
    run = json.loads((Path(run_dir) / "run.json").read_text())
    return [c for chk in run["checks"] for c in chk["cells"]]


def compare(direct: list[dict], remote: list[dict], backend: str = "cuda", rpc: str = "rpc0") -> tuple[list[list[str]], bool]:
    """Rows [check, type, path (as in the direct run), metric, direct verdict, direct value, rpc verdict, rpc value,
    same] and whether every verdict matched (cells without a counterpart count as a difference)."""
    idx: dict = {}
    for c in direct:
        idx.setdefault((c["check"], c["type"], c["path"].replace(" (non-target)", ""), c["metric"]), []).append(c)
    rows, ok, seen = [], True, set()
    for c in remote:
        if rpc not in c["path"]:
            continue
        key = (c["check"], c["type"], c["path"].replace(rpc, backend), c["metric"])
        twins = idx.get(key, [])
        n = sum(1 for k in seen if k[:4] == key)
        seen.add((*key, n))
        d = twins[n] if n < len(twins) else None
        same = d is not None and d["verdict"] == c["verdict"]
        ok &= same
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        rows.append([c["check"], c["type"], key[2], c["metric"], d["verdict"] if d else "(none)",
                     fmt(d["value"]) if d else "-", c["verdict"], fmt(c["value"]), "yes" if same else "NO"])
    return rows, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("direct")
    ap.add_argument("rpc")
    ap.add_argument("--as", dest="backend", default="cuda")
    ap.add_argument("--remote", default="rpc0")
    a = ap.parse_args(argv)
    rows, ok = compare(cells(Path(a.direct)), cells(Path(a.rpc)), a.backend, a.remote)
    head = ["check", "type", f"path ({a.backend} direct / {a.remote} over RPC)", "metric", "direct", "value",
            "over RPC", "value", "same verdict"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows)} cells compared; verdicts {'all the same' if ok else 'DIFFER (see NO rows)'}")
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main())
