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
    loaded cores) and its row says so. Per backend, every K/V write is one call (:meth:`Target.quantize_many`) and
    every attention one more (:meth:`Target.flash_attn_many`); each row gets its own answers. The inputs (K, V, Q
    per row, in row order) are drawn whatever the answers.
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
        runs = []  # (row, tk, tv, D, Dp, k, v, q)
        for t in ctx.types:
            for role, partner, D in itertools.product(("K", "V"), (t, "q8_0", "f16"), (64, 128, 256)):
                if partner == t and role == "V":
                    continue  # the symmetric pair is listed once, under K
                tk, tv = (t, partner) if role == "K" else (partner, t)
                Dp = -(-D // 128) * 128
                row = {"backend": b.name, "type": t, "role": role if partner != t else "K+V", "partner": partner,
                       "head_dim": D, "pair": f"{tk}/{tv}", "mode": b.mode_note or b.mode_label}
                rows.append(row)
                if b.software and D != 128 and (tk, tv, D) not in judged:
                    row["status"] = (f"not run on a software device: its flash-attention pipeline for head_dim {D} takes "
                                     f"minutes to compile there; PQ6 judges head_dim {D} with {t}/{t}")
                    continue
                n_kv = 32
                k = np.zeros((n_kv, Dp), np.float32)
                k[:, :D] = rng.standard_normal((n_kv, D))
                v = np.zeros((n_kv, Dp), np.float32)
                v[:, :D] = rng.standard_normal((n_kv, D))
                q = np.zeros((2, 1, Dp), np.float32)
                q[..., :D] = rng.standard_normal((2, 1, D))
                runs.append((row, tk, tv, D, Dp, k, v, q))
        _run_coverage(ctx, b.name, runs, judged)
    return rows


def _run_coverage(ctx: Context, backend: str, runs: list, judged: set) -> None:
    """Set each run's row status: its K and V written (one call), then attended (one call)."""
    writes = [(tt, x) for _, tk, tv, _, _, k, v, _ in runs for tt, x in ((tk, k), (tv, v)) if tt != "f16"]
    written = iter(ctx.target.quantize_many(backend, "set_rows", writes) if writes else [])
    calls, pending = [], []
    for row, tk, tv, D, Dp, k, v, q in runs:
        kraw = next(written) if tk != "f16" else k.astype(np.float16).view(np.uint8).reshape(-1)
        vraw = next(written) if tv != "f16" else v.astype(np.float16).view(np.uint8).reshape(-1)
        failed = next((a for a in (kraw, vraw) if isinstance(a, BaseException)), None)
        if failed is not None:
            row["status"] = _failure(failed)
            continue
        calls.append(dict(tk=tk, kraw=kraw, tv=tv, vraw=vraw, q=q, D=Dp, Dv=Dp, n_kv=k.shape[0], n_head_kv=1,
                          scale=1 / np.sqrt(D), rotate_q=tk in T.FORMATS, inverse_out=tv in T.FORMATS))
        pending.append((row, (tk, tv, D)))
    outs = ctx.target.flash_attn_many(backend, calls) if calls else []
    for (row, case), out in zip(pending, outs):
        if isinstance(out, BaseException):
            row["status"] = _failure(out)
        elif not np.all(np.isfinite(out)):
            row["status"] = "error: non-finite output"
        elif case in judged:
            row["status"] = "tested: accuracy judged by PQ6"
        else:
            row["status"] = "runs, not judged: finite output only, no PQ6 accuracy cell"


def _failure(e: BaseException) -> str:
    """A coverage row's status for a write or an attention that raised (any other exception: raised again)."""
    if isinstance(e, Unsupported):
        return f"not supported: {e}"
    if isinstance(e, (ProbeCrash, HarnessError)):
        return f"error: {e}"
    raise e


COVERAGE_COLUMNS = ["backend", "type", "role", "partner", "head_dim", "status", "mode"]


def coverage_table(rows: list[dict], not_available: list[str]) -> Table:
    """The coverage rows (:func:`coverage`) as the report's table, with a row per backend not available here."""
    out = [[r.get(k, "-") for k in COVERAGE_COLUMNS] for r in rows]
    out += [[b, "all", "all", "all", "all", "not covered: backend not available on this machine", "not examined"]
            for b in not_available]
    return Table("coverage", "Coverage (flash attention: type x role x partner x head_dim x backend)", COVERAGE_COLUMNS,
                 out, scope={"type": "type", "backend": "backend"})


BACKEND_OPS_COLUMNS = ["backend", "op", "params", "status", "error", "tool limit"]


def backend_ops_log(ctx: Context) -> Path | None:
    """Where COMPAT keeps test-backend-ops' console output (its folder made), or None without an evidence folder."""
    log = Path(ctx.evidence_dir) / ID / "test-backend-ops.log" if ctx.evidence_dir else None
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    return log


def start_backend_ops(ctx: Context) -> None:
    """COMPAT's ``prestart``: where several test-backend-ops processes may run at once
    (:func:`harness.runners.backend_ops.jobs` > 1, a machine with cores to spare), the target begins them now, beside
    the checks before COMPAT, and :func:`backend_ops_cells` waits for them; on a small machine nothing starts early."""
    from harness.runners import backend_ops
    start = getattr(ctx.target, "start_backend_ops", None)
    if start is not None and backend_ops.jobs() > 1:
        start(backend_ops_log(ctx))


def backend_ops_cells(ctx: Context, timings: dict | None = None) -> tuple[list[Cell], Table]:
    """Cells and table of the fork's test-backend-ops, which the target runs (:meth:`Target.backend_ops`): one
    'failed_cases' cell over every case parsed (the fork's failures shown, not re-judged), one SKIP per group not
    run in time, an ERROR when the tool crashed before any case. ``timings`` gets each group's seconds
    ('test-backend-ops OP')."""
    title = "test-backend-ops (the fork's own op tests, turbo-related cases)"
    log = backend_ops_log(ctx)
    res = ctx.target.backend_ops(log_path=log)
    if res is None:
        return [], Table("backend_ops", "test-backend-ops", BACKEND_OPS_COLUMNS,
                         caption=["not run: the binary is not built (`turbo-harness build --targets test-backend-ops`)"])
    if timings is not None:
        timings.update({f"test-backend-ops {g['op']}": g["seconds"] for g in res.get("groups", [])})
        if res.get("jobs", 1) > 1:  # run in parts beside the checks: the part check and the slowest part
            timings["test-backend-ops parts check"] = res.get("listing_s", 0.0)
            timings.update({f"test-backend-ops {g['op']} slowest part": max(g["part_seconds"])
                            for g in res.get("groups", []) if g.get("part_seconds")})
    table = Table("backend_ops", title, BACKEND_OPS_COLUMNS,
                  caption=[f"`{res['command']}`" + (f" - {res['note']}" if res["note"] else "")],
                  evidence=[f"evidence/{ID}/test-backend-ops.log"] if log else [])
    cells = []
    late = [g for g in res.get("groups", []) if g["status"] == "not run in time"]
    for g in late:  # a time limit is not a failure of the fork: nothing says those cases fail
        cells.append(Cell(ID, "all", f"test-backend-ops:{g['op']}", "cases_run", float(g["cases"]), None, Verdict.SKIP,
                          caveat=f"not run in time: {g['cases']} {g['op']} cases ran in the {g['limit_s']:.0f} s limit"
                                 + (f" shared by its parts ({g['parts_not_started']} of them not started)"
                                    if g.get("parts_not_started") else "")
                                 + ", the rest were not run (none of them is judged)", target=False,
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
