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

import contextlib
import itertools
import time

import numpy as np

from harness.checks.compat_tables import backend_ops_cells, coverage, coverage_table, start_backend_ops  # noqa: F401 (coverage: re-exported)
from harness.checks.contract import Check, Outcome
from harness.checks.common import Context, guarded, quant_paths
from harness.checks.observations import byte_reader, decision_thresholds, op_matrices, precise_table, quantizer_rotation
from harness.checks.pq6_attention import kernel_precision
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.targets.base import attempt, take
from harness.reference import turbo as T
from harness.reference.attention import attention, relative_error
from harness.report.model import Cell, Verdict

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


def _reference_path(ctx: Context, t: str) -> tuple[str, str]:
    """The writer whose rotation op and measured thresholds define the reference quantiser: the target backend's
    set_rows, else the first other quantise path whose thresholds can be measured (a target that cannot write the
    type still gets the other writers judged)."""
    def pick():
        paths = [(ctx.target_backend, "set_rows")] + [p for p in quant_paths(ctx) if p != (ctx.target_backend, "set_rows")]
        errs = []
        for b, r in paths:
            try:
                decision_thresholds(ctx, b, r, t)
                op_matrices(ctx, b)
                return b, r
            except (Unsupported, HarnessError) as e:
                errs.append(f"{b}:{r}: {e}")
        raise Unsupported(f"no writer's thresholds for {t} can be measured ({'; '.join(errs)})")
    return ctx.cached(("compat_ref", t), pick)


def _reference_bytes(ctx: Context, t: str, x: np.ndarray):
    """The reference quantiser's (indices, stored norms, rotated unit coordinates y float64 (n, 128), thresholds
    used (k-1,)), with the rotation op and measured thresholds of :func:`_reference_path` (the target backend's)."""
    rb, rr = _reference_path(ctx, t)
    R = op_matrices(ctx, rb)["R"]
    thr = decision_thresholds(ctx, rb, rr, t)
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


def _attn_inputs(ctx: Context, t: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-decode inputs of a type: K float32 (2*128, 128) (scale 2), V float32 (2*128, 128), Q float32 (4, 4, 128)."""
    rng = ctx.rng(f"compat-attn-{t}")
    kx = (2.0 * rng.standard_normal((2 * 128, 128))).astype(np.float32)
    vx = rng.standard_normal((2 * 128, 128)).astype(np.float32)
    return kx, vx, rng.standard_normal((4, 4, 128)).astype(np.float32)


def _write_all(ctx: Context, x: np.ndarray) -> dict:
    """Every write COMPAT makes, one call per quantise path (:meth:`Target.quantize_many`): per type the matrix rows
    ``x`` and the cross-decode K and V. Returns {(backend, route, type, 'rows' | 'K' | 'V'): bytes or the exception
    that write raised (:func:`take` raises it where that write's cell is made)."""
    keys = [(t, role) for t in ctx.types for role in ("rows", "K", "V")]
    inputs = {t: dict(zip(("K", "V"), _attn_inputs(ctx, t)[:2]), rows=x) for t in ctx.types}
    out = {}
    for backend, route in quant_paths(ctx):
        answers = ctx.target.quantize_many(backend, route, [(t, inputs[t][role]) for t, role in keys])
        out.update({(backend, route, t, role): a for (t, role), a in zip(keys, answers)})
    return out


def _writer_matrix(ctx: Context, t: str, writers: dict, written=None, x: np.ndarray | None = None) -> list[Cell]:
    """Cells for each writer vs the reference and each pair of writers; fills ``writers`` {path: bytes} from
    ``written`` (:func:`_write_all`'s answers, or its exception; made here when not given) for the rows ``x``
    (default :func:`_rows`)."""
    x = _rows(ctx) if x is None else x
    written = _write_all(ctx, x) if written is None else written
    ref_idx, ref_norm, y, ref_th = _reference_bytes(ctx, t, x)
    ref_bytes = T.pack(t, ref_idx, ref_norm).reshape(-1)
    ref_path = _reference_path(ctx, t)
    ref_thr = _thresholds(ctx, *ref_path, t)
    cells, dev, thr = [], {}, {}
    for backend, route in quant_paths(ctx):
        def w(backend=backend, route=route):
            p = f"{backend}:{route}"
            writers[p] = take(take(written)[(backend, route, t, "rows")])
            thr[p] = _thresholds(ctx, backend, route, t)
            d = _diff(ctx, t, writers[p], ref_bytes, y, thr[p], ref_thr, ref_th)
            dev[p] = d
            ev = ctx.evidence(ID, f"{t}_{backend}_{route}_writer", bytes=writers[p], reference=ref_bytes)
            vd, cav = _verdict(ctx, d, p, f"the reference ({':'.join(ref_path)} thresholds)")
            try:
                reader = byte_reader(ctx, backend, t)
            except Unsupported as e:  # the bytes were compared through the reference decoder all the same: the
                reader = ("the reference decoder", str(e))  # measured verdict stands (it was a SKIP)
            if reader[0] != backend:  # a writer-only backend: judged through another reader of the same bytes
                d["reader"] = ":".join(reader) if reader[0] != "the reference decoder" else reader[0]
                cav = "; ".join(x for x in (cav, f"{backend} writes {t} but cannot read it: its bytes were read by "
                                                 f"{d['reader']}") if x)
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


def _cross_decode(ctx: Context, writers: dict, written: dict) -> dict:
    """Bytes of every writer that worked, attended on every backend, vs exact attention on those bytes.

    Args:
        writers: {type: {path: bytes}} of the writer matrices. written: :func:`_write_all`'s K/V bytes (or its
            exception).
    Returns {type: [cells]}. Every reader runs all its attentions (every type and writer) as one call
    (:meth:`Target.flash_attn_many`); each cell gets its own answer.
    """
    n_kv, nkv, scale = 128, 2, 1 / np.sqrt(128)
    readers = [b for b in ctx.backends() if ctx.target.routes(b.name).attention]  # metal-src: none (coverage says why)
    refs, calls = {}, []  # (t, wb, wr) -> (K bytes, V bytes, exact attention on them) or its exception

    def exact(t, wb, wr, q):
        kraw, vraw = take(take(written)[(wb, wr, t, "K")]), take(take(written)[(wb, wr, t, "V")])
        qr = quantizer_rotation(ctx, wb, wr, t)
        Rw = qr["R"] if qr["R"] is not None else op_matrices(ctx, wb)["R"]
        tables = {t: precise_table(ctx, t, wb)}
        kd = T.decode_any(t, kraw, nkv * n_kv, 128, tables).astype(np.float64) @ Rw
        vd = T.decode_any(t, vraw, nkv * n_kv, 128, tables).astype(np.float64) @ Rw
        return kraw, vraw, attention(q, kd.reshape(nkv, n_kv, 128), vd.reshape(nkv, n_kv, 128), scale)
    for t in ctx.types:
        q = _attn_inputs(ctx, t)[2]
        for wb, wr in quant_paths(ctx):
            if f"{wb}:{wr}" in writers.get(t, {}):
                refs[(t, wb, wr)] = attempt(exact, t, wb, wr, q)
                if not isinstance(refs[(t, wb, wr)], BaseException):
                    kraw, vraw, _ = refs[(t, wb, wr)]
                    calls.append(((t, wb, wr), dict(tk=t, kraw=kraw, tv=t, vraw=vraw, q=q, D=128, Dv=128, n_kv=n_kv,
                                                    n_head_kv=nkv, scale=scale, rotate_q=True, inverse_out=True)))
    outs = {}
    for reader in readers:
        answers = ctx.target.flash_attn_many(reader.name, [c for _, c in calls]) if calls else []
        outs.update({(*key, reader.name): a for (key, _), a in zip(calls, answers)})

    cells: dict = {t: [] for t in ctx.types}
    for (t, wb, wr), reader in itertools.product(refs, readers):
        def one(t=t, wb=wb, wr=wr, reader=reader):
            kraw, vraw, ref = take(refs[(t, wb, wr)])
            out = take(outs[(t, wb, wr, reader.name)])
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
        cells[t] += guarded(ctx, ID, t, reader.name, "flash_attn", one)
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


def run(ctx: Context) -> Outcome:
    """COMPAT cells (writer matrix, cross-decode, WHT agreement, test-backend-ops), the coverage table and the
    test-backend-ops table."""
    cells = Outcome()
    clock = _Clock(cells.timings)
    x = _rows(ctx)
    with T.layouts_in_use(ctx.target.layouts()), clock("writes"):
        written = attempt(_write_all, ctx, x)  # a failure of the whole: every writer matrix's cell says it
    writers: dict = {t: {} for t in ctx.types}
    with clock("writer matrix"):
        matrix = {t: guarded(ctx, ID, t, ctx.target_backend, "set_rows",
                             lambda t=t: _writer_matrix(ctx, t, writers[t], written, x)) for t in ctx.types}
    with T.layouts_in_use(ctx.target.layouts()), clock("cross-decode"):
        decoded = attempt(_cross_decode, ctx, writers, written)  # a failure of the whole: one cell per type, as below
    for t in ctx.types:  # per type, its writer matrix then its cross-decode
        cells += matrix[t]
        cells += guarded(ctx, ID, t, ctx.target_backend, "flash_attn", lambda t=t: take(decoded)[t])
    with clock("rotation op"):
        cells += guarded(ctx, ID, "all", ctx.target_backend, "turbo_wht", lambda: _wht_agreement(ctx))
    if len(ctx.backends()) < 2:
        cells.notes.append(
            "only one backend in this build: the matrix covers its paths only (writers "
            f"{', '.join(f'{b}:{r}' for b, r in quant_paths(ctx))}); not covered here: "
            f"{', '.join(ctx.not_available) or '-'}")
    with clock("coverage"):
        cells.tables.append(coverage_table(coverage(ctx), ctx.not_available))
    with clock("test-backend-ops"):
        ops_cells, ops_table = backend_ops_cells(ctx, cells.timings)
    cells += ops_cells
    cells.tables.append(ops_table)
    return cells


class _Clock:
    """``with clock(part):`` adds the part's wall seconds to ``timings[part]``."""

    def __init__(self, timings: dict):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, part: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[part] = round(self.timings.get(part, 0.0) + time.monotonic() - t0, 3)


CHECK = Check(ID, TITLE, run, order=70, rules="COMPAT", needs=("probe", "test-backend-ops"), prestart=start_backend_ops)
