"""COMPAT: the cross-backend writer x reader matrix, a coverage table, and the fork's test-backend-ops.

Spec "Cross-backend compatibility": the same rows quantised by every writer path; raw block diffs
between writers (index and norm fields separately), each index disagreement classified as a
boundary flip (the reference rotated coordinate lies within ``boundary_flip_abs`` of a decision
threshold) or a real one; bytes written on A attended on B (cross-decode) vs B's own bytes
(self-decode); the rotation op compared across backends. A deviation is attributed to the writer
whose bytes differ from the reference quantiser (target backend's rotation op and thresholds), so a
fallback writer that is wrong gives PARTIAL naming it, a target writer that is wrong gives FAIL.
"""
from __future__ import annotations

import itertools

import numpy as np

from harness.checks.contract import Check, Outcome
from harness.checks.common import (Context, decision_thresholds, guarded, op_matrices, precise_table, quant_paths,
                                   quantizer_rotation)
from harness.checks.pq6_attention import kernel_precision
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.attention import attention, relative_error
from harness.report.model import Cell, Table, Verdict

ID, TITLE = "COMPAT", "Cross-backend compatibility (writer x reader matrix)"


def _rows(ctx: Context) -> np.ndarray:
    """float32 (rows, 128) Gaussian rows; ``COMPAT.rows`` (8192: 2^20 values per type) resolves a 1e-5 index
    disagreement rate with ~10 events (spec "Integrity of a verdict")."""
    return ctx.rng("compat").standard_normal((int(ctx.th("COMPAT", "rows")), 128)).astype(np.float32)


def _thresholds(ctx: Context, backend: str, route: str, t: str) -> dict | None:
    """A writer's measured decision thresholds (PQ2's measurement, cached), or None when they cannot be measured."""
    try:
        return decision_thresholds(ctx, backend, route, t)
    except (Unsupported, ProbeCrash, HarnessError):
        return None


def _reference_bytes(ctx: Context, t: str, x: np.ndarray):
    """The reference quantiser's (indices, stored norms, rotated unit coordinates y float64 (n, 128), thresholds
    used (k-1,)), with the target backend's rotation op and measured thresholds."""
    tb = ctx.target_backend
    R = op_matrices(ctx, tb)["R"]
    thr = decision_thresholds(ctx, tb, "set_rows", t)
    th = np.where(np.isnan(thr["thresholds"]), thr["midpoints"], thr["thresholds"])
    idx, stored, y = T.quantize(x, R, thr["table"], th)
    return idx, stored, y, th


def _diff(ctx: Context, t: str, a: np.ndarray, b: np.ndarray, y: np.ndarray, thr_a: dict | None, thr_b: dict | None,
          ref_th: np.ndarray) -> dict:
    """Compare two writers' bytes for the same rows, classifying every index disagreement.

    Args:
        a, b: raw bytes of the two writers. y: reference rotated unit coordinates float64 (n, 128).
        thr_a, thr_b: each writer's measured thresholds (decision_thresholds dicts; None: unknown).
        ref_th: the reference thresholds (k-1,).

    Returns counts: 'threshold_flips' (real: y lies between the two writers' measured thresholds, which
    differ by more than PQ2's threshold_path_diff; the cause is known), 'boundary_flips' (ties: y within
    ``general.boundary_flip_abs`` of a threshold, not explained by a threshold difference),
    'real_index_diffs' (unexplained real differences), per-element rates, norm field ulps, and
    'threshold_pairs' (the differing thresholds of a and b that caused flips). Norm fields are compared in
    the groups whose indices all agree (a flipped index changes ||c||, hence the corrected norm).
    """
    ia, na, _ = T.unpack(t, a)
    ib, nb, _ = T.unpack(t, b)
    dis = ia != ib
    n = dis.size
    lo = np.minimum(ia, ib)[dis].astype(np.int64)
    hi = np.maximum(ia, ib)[dis].astype(np.int64)
    yv = y[dis]
    adjacent = (hi - lo) == 1
    k = np.clip(lo, 0, len(ref_th) - 1)
    explained = np.zeros(len(yv), bool)
    causes: list[tuple[float, float]] = []
    if thr_a is not None and thr_b is not None:
        ta = np.where(np.isnan(thr_a["thresholds"]), ref_th, thr_a["thresholds"])
        tb = np.where(np.isnan(thr_b["thresholds"]), ref_th, thr_b["thresholds"])
        res = np.nan_to_num(thr_a["resolution"]) + np.nan_to_num(thr_b["resolution"])
        differs = np.abs(ta - tb) > ctx.th("PQ2", "threshold_path_diff") + res
        lo_t, hi_t = np.minimum(ta, tb)[k] - res[k], np.maximum(ta, tb)[k] + res[k]
        explained = adjacent & differs[k] & (yv >= lo_t) & (yv <= hi_t)
        causes = sorted({(float(ta[j]), float(tb[j])) for j in np.unique(k[explained])}, key=lambda p: -abs(p[0]))
    tie = ~explained & adjacent & (np.abs(yv - ref_th[k]) < ctx.th("general", "boundary_flip_abs"))
    real = int(np.count_nonzero(~explained & ~tie))
    # a flipped index changes ||c|| and so the corrected norm: norms are compared where the indices agree
    same = ~dis.reshape(len(na), -1).any(axis=1)
    ulps = np.abs(na.view(np.int16).astype(np.int32) - nb.view(np.int16).astype(np.int32))[same]
    return {"index_diffs": int(np.count_nonzero(dis)), "boundary_flips": int(np.count_nonzero(tie)),
            "threshold_flips": int(np.count_nonzero(explained)), "threshold_flips_per_element": float(explained.sum()) / n,
            "real_index_diffs": real, "real_per_element": real / n, "values": n,
            "threshold_pairs": causes[:4],
            "norm_fields_differing": int(np.count_nonzero(ulps)), "norm_max_ulps": int(ulps.max()) if ulps.size else 0,
            "raw_bytes_differing": int(np.count_nonzero(a != b))}


def _show(values: list[float], dec: int) -> str:
    """Up to two thresholds as '±0.145561/±0.013964' (a value and its negative shown once) or signed values."""
    out: list[str] = []
    for v in values:
        sym = any(abs(w + v) <= 10.0 ** -dec for w in values) and v != 0
        txt = f"±{abs(v):.{dec}f}" if sym else f"{v:+.{dec}f}"
        if txt not in out:
            out.append(txt)
    return "/".join(out[:2])


def _verdict(ctx: Context, d: dict, a: str, b: str) -> tuple[Verdict, str]:
    """PASS: no real difference (boundary ties alone); PARTIAL: only flips explained by the two writers'
    measured threshold difference, at a rate up to COMPAT.explained_flip_rate_max (a real but tiny difference,
    reported with its size and cause); FAIL otherwise (unexplained real differences, norms beyond 1 ulp, or
    explained flips at a larger rate)."""
    rate_max = ctx.th("COMPAT", "real_index_rate")
    n = d["values"]
    size = f"per 2^{np.log2(n):.0f} values" if float(np.log2(n)).is_integer() else f"of {n} values"
    ties = f"; {d['boundary_flips']} boundary ties" if d["boundary_flips"] else ""
    if d["real_per_element"] > rate_max or d["norm_max_ulps"] > 1:
        return Verdict.FAIL, (f"{a} and {b} write different bytes: {d['real_index_diffs']} real index diffs {size} "
                              f"(not explained by a threshold difference), {d['threshold_flips']} threshold flips"
                              f"{ties}, norm fields up to {d['norm_max_ulps']} fp16 ulps")
    if d["threshold_flips"]:
        pairs = d["threshold_pairs"]
        dec = max(6, int(np.ceil(-np.log10(max(min(abs(p - q) for p, q in pairs), 1e-12))))) if pairs else 6
        why = f"{a} thresholds {_show([p for p, _ in pairs], dec)} vs {b} {_show([q for _, q in pairs], dec)}"
        msg = (f"{why}: {d['threshold_flips']} real index flips {size} ({d['threshold_flips_per_element']:.2g} per value), "
               f"values lying between the two paths' thresholds{ties}")
        if d["threshold_flips_per_element"] > ctx.th("COMPAT", "explained_flip_rate_max"):
            return Verdict.FAIL, msg + ": the thresholds differ materially"
        return Verdict.PARTIAL, msg + ": a real but tiny difference"
    return Verdict.PASS, ""


def _writer_matrix(ctx: Context, t: str, writers: dict) -> list[Cell]:
    """Cells for each writer vs the reference and each pair of writers; fills ``writers`` {path: bytes}."""
    x = _rows(ctx)
    ref_idx, ref_norm, y, ref_th = _reference_bytes(ctx, t, x)
    ref_bytes = T.pack(t, ref_idx, ref_norm).reshape(-1)
    ref_thr = _thresholds(ctx, ctx.target_backend, "set_rows", t)
    cells, dev, thr = [], {}, {}
    for backend, route in quant_paths(ctx):
        def w(backend=backend, route=route):
            p = f"{backend}:{route}"
            writers[p] = ctx.target.quantize(backend, route, t, x)
            thr[p] = _thresholds(ctx, backend, route, t)
            d = _diff(ctx, t, writers[p], ref_bytes, y, thr[p], ref_thr, ref_th)
            dev[p] = d
            ev = ctx.evidence(ID, f"{t}_{backend}_{route}_writer", bytes=writers[p], reference=ref_bytes)
            vd, cav = _verdict(ctx, d, p, f"the reference ({ctx.target_backend}:set_rows thresholds)")
            return [ctx.cell(ID, t, backend, route, "writer_real_index_diff_per_element_vs_reference",
                             d["real_per_element"], ctx.th("COMPAT", "real_index_rate"), vd, caveat=cav, details=d,
                             evidence=ev)]
        cells += guarded(ctx, ID, t, backend, route, w)
    for a, b in itertools.combinations(sorted(writers), 2):
        d = _diff(ctx, t, writers[a], writers[b], y, thr.get(a), thr.get(b), ref_th)
        vd, cav = _verdict(ctx, d, a, b)
        culprit = max((a, b), key=lambda p: (dev[p]["real_index_diffs"], dev[p]["threshold_flips"], dev[p]["norm_max_ulps"]))
        be, route = culprit.split(":")
        if vd == Verdict.FAIL:
            cav += f"; {culprit} deviates from the reference"
        c = ctx.cell(ID, t, be, route, "pair_real_index_diff_per_element", d["real_per_element"],
                     ctx.th("COMPAT", "real_index_rate"), vd, caveat=cav, details={"writers": [a, b], **d},
                     evidence=[f"evidence/{ID}/{t}_{a.replace(':', '_')}_writer.npz", f"evidence/{ID}/{t}_{b.replace(':', '_')}_writer.npz"]
                     if ctx.evidence_dir else [])
        c.path = f"{a} x {b}"
        if vd == Verdict.PARTIAL:
            c.target = ctx.is_target(*a.split(":")) or ctx.is_target(*b.split(":"))
        cells.append(c)
    return cells


def _cross_decode(ctx: Context, t: str, writers: dict) -> list[Cell]:
    """Bytes of every writer that worked, attended on every backend, vs exact attention on those bytes."""
    cells = []
    rng = ctx.rng(f"compat-attn-{t}")
    n_kv, nh, nkv = 128, 4, 2
    kx = (2.0 * rng.standard_normal((nkv * n_kv, 128))).astype(np.float32)
    vx = rng.standard_normal((nkv * n_kv, 128)).astype(np.float32)
    q = rng.standard_normal((nh, 4, 128)).astype(np.float32)
    scale = 1 / np.sqrt(128)
    writer_paths = [(b, r) for b, r in quant_paths(ctx) if f"{b}:{r}" in writers]
    written: dict = {}  # writer -> (K bytes, V bytes, exact attention on them): quantised and decoded once

    def write(wb, wr):
        if (wb, wr) not in written:
            kraw = ctx.target.quantize(wb, wr, t, kx)
            vraw = ctx.target.quantize(wb, wr, t, vx)
            qr = quantizer_rotation(ctx, wb, wr, t)
            Rw = qr["R"] if qr["R"] is not None else op_matrices(ctx, wb)["R"]
            tables = {t: precise_table(ctx, t, wb)}
            kd = T.decode_any(t, kraw, nkv * n_kv, 128, tables).astype(np.float64) @ Rw
            vd = T.decode_any(t, vraw, nkv * n_kv, 128, tables).astype(np.float64) @ Rw
            written[(wb, wr)] = (kraw, vraw, attention(q, kd.reshape(nkv, n_kv, 128), vd.reshape(nkv, n_kv, 128), scale))
        return written[(wb, wr)]

    readers = [b for b in ctx.backends() if ctx.target.routes(b.name).attention]  # metal-src: none (coverage says why)
    for (wb, wr), reader in itertools.product(writer_paths, readers):
        def one(wb=wb, wr=wr, reader=reader):
            kraw, vraw, ref = write(wb, wr)
            out = ctx.target.flash_attn(reader.name, t, kraw, t, vraw, q, 128, 128, n_kv, nkv, scale, True, True, 128, True)
            err = relative_error(out, ref)
            tol = kernel_precision(ctx, reader.name)["tol"]
            ok = err <= tol
            ev = ctx.evidence(ID, f"{t}_{wb}_{wr}_to_{reader.name}", out=out, ref=ref)
            c = ctx.cell(ID, t, reader.name, "flash_attn", "cross_decode_rel_err", err, tol,
                         Verdict.PASS if ok else Verdict.FAIL, evidence=ev,
                         caveat="" if ok else f"bytes written by {wb}:{wr} attended on {reader.name}: error {err:.3g}",
                         details={"writer": f"{wb}:{wr}", "reader": reader.name, "self": wb == reader.name})
            # blame the writer when the reader reads its own bytes correctly
            if not ok and wb != reader.name:
                c.target = ctx.is_target(wb, wr) and ctx.is_target(reader.name, "flash_attn")
                if not c.target and c.verdict == Verdict.FAIL:
                    c.verdict = Verdict.PARTIAL
                    c.caveat += f"; only a non-target pairing ({wb}:{wr} written, {reader.name} reading)"
            c.path = f"{wb}:{wr} -> {reader.name}:flash_attn"
            return [c]
        cells += guarded(ctx, ID, t, reader.name, "flash_attn", one)
    return cells


def _wht_agreement(ctx: Context) -> list[Cell]:
    cells = []
    bs = ctx.backends()
    mats = {}
    for b in bs:
        try:
            mats[b.name] = op_matrices(ctx, b.name)["R"]
        except (Unsupported, ProbeCrash, HarnessError) as e:
            cells.append(Cell(ID, "all", f"{b.name}:turbo_wht", "-", None, None, Verdict.SKIP, caveat=f"not covered: {e}",
                              target=b.name == ctx.target_backend))
    for a, b in itertools.combinations(sorted(mats), 2):
        d = float(np.max(np.abs(mats[a] - mats[b])))
        tol = ctx.th("PQ1", "max_abs_err")
        non_target = b if a == ctx.target_backend else a
        c = ctx.cell(ID, "all", non_target, "turbo_wht", "wht_op_max_abs_diff", d, tol,
                     Verdict.PASS if d <= tol else Verdict.FAIL,
                     caveat="" if d <= tol else f"rotation op differs between {a} and {b} by {d:.3g}")
        c.path = f"{a}:turbo_wht x {b}:turbo_wht"
        cells.append(c)
    return cells


def coverage(ctx: Context) -> list[dict]:
    """Coverage table rows: type x role x partner x head_dim x backend -> status.

    A combination that runs with finite output is 'judged by PQ6' when PQ6's case list has it (its
    accuracy is measured there), else 'runs, not judged' (a smoke run: nothing says its output is right).
    """
    from harness.checks.pq6_attention import cases as pq6_cases
    judged = {(c["tk"], c["tv"], c["D"]) for c in pq6_cases(ctx.types)}
    rows = []
    rng = ctx.rng("coverage")
    for b in ctx.backends():
        rts = ctx.target.routes(b.name)
        if not rts.attention:  # not examined here, with the reason (metal-src: simdgroup semantics)
            rows += [{"backend": b.name, "type": t, "role": "all", "partner": "all", "head_dim": "all",
                      "status": f"not examined: {rts.attention_note or 'no flash attention on this backend'}"}
                     for t in ctx.types]
            continue
        for t in ctx.types:
            for role, partner, D in itertools.product(("K", "V"), (t, "q8_0", "f16"), (64, 128, 256)):
                if partner == t and role == "V":
                    continue  # the symmetric pair is listed once, under K
                tk, tv = (t, partner) if role == "K" else (partner, t)
                Dp = -(-D // 128) * 128
                row = {"backend": b.name, "type": t, "role": role if partner != t else "K+V", "partner": partner,
                       "head_dim": D, "pair": f"{tk}/{tv}"}
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


COVERAGE_COLUMNS = ["backend", "type", "role", "partner", "head_dim", "status"]


def coverage_table(rows: list[dict], not_available: list[str]) -> Table:
    """The coverage rows (:func:`coverage`) as the report's table, with a row per backend not available here."""
    out = [[r[k] for k in COVERAGE_COLUMNS] for r in rows]
    out += [[b, "all", "all", "all", "all", "not covered: backend not available on this machine"] for b in not_available]
    return Table("coverage", "Coverage (flash attention: type x role x partner x head_dim x backend)", COVERAGE_COLUMNS,
                 out, scope={"type": "type", "backend": "backend"})


def run(ctx: Context) -> Outcome:
    """COMPAT cells (writer matrix, cross-decode, WHT agreement, test-backend-ops), the coverage table and the
    test-backend-ops table."""
    cells = Outcome()
    for t in ctx.types:
        writers: dict = {}
        cells += guarded(ctx, ID, t, ctx.target_backend, "set_rows", lambda t=t, w=writers: _writer_matrix(ctx, t, w))
        cells += guarded(ctx, ID, t, ctx.target_backend, "flash_attn", lambda t=t, w=writers: _cross_decode(ctx, t, w))
    cells += guarded(ctx, ID, "all", ctx.target_backend, "turbo_wht", lambda: _wht_agreement(ctx))
    if len(ctx.backends()) < 2:
        cells.notes.append(
            "only one backend in this build: the matrix covers its paths only (writers "
            f"{', '.join(f'{b}:{r}' for b, r in quant_paths(ctx))}); not covered here: "
            f"{', '.join(ctx.not_available) or '-'}")
    cells.tables.append(coverage_table(coverage(ctx), ctx.not_available))
    ops_cells, ops_table = _backend_ops(ctx)
    cells += ops_cells
    cells.tables.append(ops_table)
    return cells


BACKEND_OPS_COLUMNS = ["backend", "op", "params", "status", "error", "tool limit"]


def _backend_ops(ctx: Context) -> tuple[list[Cell], Table]:
    """Cells and table of the fork's test-backend-ops, which the target runs (:meth:`Target.backend_ops`)."""
    from pathlib import Path
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
    if res["results"]:
        for r in res["results"]:
            err = "-" if r["error"] is None else f"{r['metric']} {r['error']:.3g}"
            lim = "-" if r["max_error"] is None else f"{r['max_error']:.3g}"
            table.rows.append([r["backend"], r["op"], r["params"], r["status"], err, lim])
        n_fail = sum(r["status"] == "FAIL" for r in res["results"])
        n_ok = sum(r["status"] == "OK" for r in res["results"])
        crashed = res["returncode"] not in (0, None)
        c = Cell(ID, "all", "test-backend-ops", "failed_cases", float(n_fail), 0.0,
                 Verdict.PASS if n_fail == 0 and not crashed else Verdict.PARTIAL,
                 caveat=f"{n_ok} OK, {n_fail} FAIL, {len(res['results']) - n_ok - n_fail} not supported/skipped "
                        "(the fork's own limits; its failures are shown, not re-judged)"
                        + (f"; the tool aborted: {res['note']}" if crashed else ""),
                 target=False, evidence=[f"evidence/{ID}/test-backend-ops.log"] if log else [])
        cells.append(c)
    elif res["returncode"] not in (0, None) or "timed out" in res["note"]:
        cells.append(Cell(ID, "all", "test-backend-ops", "-", None, None, Verdict.ERROR, caveat=res["note"], target=False))
    return cells, table


CHECK = Check(ID, TITLE, run, order=70, rules="COMPAT", needs=("probe", "test-backend-ops"))
