"""COMPAT's tables: the flash-attention coverage table and the fork's own test-backend-ops cells and table.

Coverage: every type x role x partner x head_dim x backend, with its status (judged by PQ6, runs, not supported,
error) and how the backend was examined (:attr:`harness.targets.base.Backend.mode`: executed, or executed on a
software device such as lavapipe). test-backend-ops: run by the target (:meth:`harness.targets.base.Target.backend_ops`),
one process per case group; a group past its time limit is a SKIP 'not run in time' with the count of cases run.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from harness.checks.common import Context
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.report.model import Cell, Table, Verdict

ID = "COMPAT"


def coverage(ctx: Context) -> list[dict]:
    """Coverage table rows: type x role x partner x head_dim x backend -> status.

    A combination that runs with finite output is 'judged by PQ6' when PQ6's case list has it (its
    accuracy is measured there), else 'runs, not judged' (a smoke run: nothing says its output is right). On a
    software device (lavapipe), a smoke run at a head_dim other than 128 that PQ6 does not judge is not run (each
    new flash-attention pipeline compiles for minutes on the CPU there: measured 5+ min for head_dim 256 on 2
    loaded cores) and its row says so.
    """
    from harness.checks.pq6_attention import cases as pq6_cases
    rows = []
    rng = ctx.rng("coverage")
    for b in ctx.backends():
        judged = {(c["tk"], c["tv"], c["D"]) for c in pq6_cases(ctx.types, b.software)}
        rts = ctx.target.routes(b.name)
        if not rts.attention:  # not examined here, with the reason (metal-src: simdgroup semantics)
            rows += [{"backend": b.name, "type": t, "role": "all", "partner": "all", "head_dim": "all",
                      "status": f"not examined: {rts.attention_note or 'no flash attention on this backend'}",
                      "mode": b.mode_note or b.mode_label} for t in ctx.types]
            continue
        for t in ctx.types:
            for role, partner, D in itertools.product(("K", "V"), (t, "q8_0", "f16"), (64, 128, 256)):
                if partner == t and role == "V":
                    continue  # the symmetric pair is listed once, under K
                tk, tv = (t, partner) if role == "K" else (partner, t)
                Dp = -(-D // 128) * 128
                row = {"backend": b.name, "type": t, "role": role if partner != t else "K+V", "partner": partner,
                       "head_dim": D, "pair": f"{tk}/{tv}", "mode": b.mode_note or b.mode_label}
                if b.software and D != 128 and (tk, tv, D) not in judged:
                    row["status"] = (f"not run on a software device: its flash-attention pipeline for head_dim {D} takes "
                                     f"minutes to compile there; PQ6 judges head_dim {D} with {t}/{t}")
                    rows.append(row)
                    continue
                try:
                    n_kv = 32
                    k = np.zeros((n_kv, Dp), np.float32)
                    k[:, :D] = rng.standard_normal((n_kv, D))
                    v = np.zeros((n_kv, Dp), np.float32)
                    v[:, :D] = rng.standard_normal((n_kv, D))
                    kraw = ctx.target.quantize(b.name, "set_rows", tk, k) if tk != "f16" else k.astype(np.float16).view(np.uint8).reshape(-1)
                    vraw = ctx.target.quantize(b.name, "set_rows", tv, v) if tv != "f16" else v.astype(np.float16).view(np.uint8).reshape(-1)
                    q = np.zeros((2, 1, Dp), np.float32)
                    q[..., :D] = rng.standard_normal((2, 1, D))
                    out = ctx.target.flash_attn(b.name, tk, kraw, tv, vraw, q, Dp, Dp, n_kv, 1, 1 / np.sqrt(D),
                                                tk in T.FORMATS, tv in T.FORMATS, 128, True)
                    if not np.all(np.isfinite(out)):
                        row["status"] = "error: non-finite output"
                    elif (tk, tv, D) in judged:
                        row["status"] = "tested: accuracy judged by PQ6"
                    else:
                        row["status"] = "runs, not judged: finite output only, no PQ6 accuracy cell"
                except Unsupported as e:
                    row["status"] = f"not supported: {e}"
                except (ProbeCrash, HarnessError) as e:
                    row["status"] = f"error: {e}"
                rows.append(row)
    return rows


COVERAGE_COLUMNS = ["backend", "type", "role", "partner", "head_dim", "status", "mode"]


def coverage_table(rows: list[dict], not_available: list[str]) -> Table:
    """The coverage rows (:func:`coverage`) as the report's table, with a row per backend not available here."""
    out = [[r.get(k, "-") for k in COVERAGE_COLUMNS] for r in rows]
    out += [[b, "all", "all", "all", "all", "not covered: backend not available on this machine", "not examined"]
            for b in not_available]
    return Table("coverage", "Coverage (flash attention: type x role x partner x head_dim x backend)", COVERAGE_COLUMNS,
                 out, scope={"type": "type", "backend": "backend"})


BACKEND_OPS_COLUMNS = ["backend", "op", "params", "status", "error", "tool limit"]


def backend_ops_cells(ctx: Context) -> tuple[list[Cell], Table]:
    """Cells and table of the fork's test-backend-ops, which the target runs (:meth:`Target.backend_ops`): one
    'failed_cases' cell over every case parsed (the fork's failures shown, not re-judged), one SKIP per group not
    run in time, an ERROR when the tool crashed before any case."""
    title = "test-backend-ops (the fork's own op tests, turbo-related cases)"
    log = Path(ctx.evidence_dir) / ID / "test-backend-ops.log" if ctx.evidence_dir else None
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    res = ctx.target.backend_ops(log_path=log)
    if res is None:
        return [], Table("backend_ops", "test-backend-ops", BACKEND_OPS_COLUMNS,
                         caption=["not run: the binary is not built (`turbo-harness build --targets test-backend-ops`)"])
    table = Table("backend_ops", title, BACKEND_OPS_COLUMNS,
                  caption=[f"`{res['command']}`" + (f" - {res['note']}" if res["note"] else "")],
                  evidence=[f"evidence/{ID}/test-backend-ops.log"] if log else [])
    cells = []
    late = [g for g in res.get("groups", []) if g["status"] == "not run in time"]
    for g in late:  # a time limit is not a failure of the fork: nothing says those cases fail
        cells.append(Cell(ID, "all", f"test-backend-ops:{g['op']}", "cases_run", float(g["cases"]), None, Verdict.SKIP,
                          caveat=f"not run in time: {g['cases']} {g['op']} cases ran in the {g['limit_s']:.0f} s limit, "
                                 f"the rest were not run (none of them is judged)", target=False,
                          details=dict(g), evidence=[f"evidence/{ID}/test-backend-ops.log"] if log else []))
    if res["results"]:
        for r in res["results"]:
            err = "-" if r["error"] is None else f"{r['metric']} {r['error']:.3g}"
            lim = "-" if r["max_error"] is None else f"{r['max_error']:.3g}"
            table.rows.append([r["backend"], r["op"], r["params"], r["status"], err, lim])
        n_fail = sum(r["status"] == "FAIL" for r in res["results"])
        n_ok = sum(r["status"] == "OK" for r in res["results"])
        crashed = res["returncode"] not in (0, None)
        # no case ran to completion (every one not supported or skipped): nothing was tested, never PASS
        vd = (Verdict.PARTIAL if n_fail or crashed else Verdict.PASS if n_ok else Verdict.SKIP)
        c = Cell(ID, "all", "test-backend-ops", "failed_cases", float(n_fail), 0.0, vd,
                 caveat=("no case was tested: " if vd == Verdict.SKIP else "")
                        + f"{n_ok} OK, {n_fail} FAIL, {len(res['results']) - n_ok - n_fail} not supported/skipped "
                        "(the fork's own limits; its failures are shown, not re-judged)"
                        + (f"; the tool aborted: {res['note']}" if crashed else "")
                        + (f"; not run in time: {', '.join(g['op'] for g in late)}" if late else ""),
                 target=False, evidence=[f"evidence/{ID}/test-backend-ops.log"] if log else [])
        cells.append(c)
    elif res["returncode"] not in (0, None):
        cells.append(Cell(ID, "all", "test-backend-ops", "-", None, None, Verdict.ERROR, caveat=res["note"], target=False))
    return cells, table
