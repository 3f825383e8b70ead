"""PQ2 Codebook and decision rule.

Measured (spec PQ2): each decode path's centroid table (crafted blocks, norm 1, every index), each
quantise path's decision thresholds (a rotated coordinate swept across each), the Lloyd-Max
optimum for one coordinate of a random unit vector in d = 128 (Beta((d-1)/2, (d-1)/2) on [-1, 1],
SciPy) and the expected squared error of the measured (table, thresholds) under that law.
"""
from __future__ import annotations

import itertools

import numpy as np

from harness.checks.contract import Check, Outcome
from harness.checks.common import Context, guarded, quant_paths
from harness.checks.observations import (LOSSY_DECODE, centroid_table, centroid_table_spread, decision_thresholds,
                                         decode_route)
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.lloydmax import expected_distortion, lloyd_max
from harness.report.model import Cell, Verdict

ID, TITLE = "PQ2", "Codebook and decision rule (Lloyd-Max, midpoints)"


def _table_cells(ctx: Context, t: str, notes: list[str]) -> list[Cell]:
    cells = []
    tables = {}
    for b in ctx.backends():
        def one(b=b):
            r = decode_route(ctx, b.name, t)
            tables[(b.name, r)] = centroid_table(ctx, b.name, r, t)
            return []
        cells += guarded(ctx, ID, t, b.name, "decode", one)
        for r2 in ctx.target.routes(b.name).readers:  # further reads of the same bytes (metal-src:dequant_t4)
            def more(b=b, r2=r2):
                tables[(b.name, r2)] = centroid_table(ctx, b.name, r2, t)
                return []
            cells += guarded(ctx, ID, t, b.name, r2, more)
    exact = [k for k in tables if k[1] not in LOSSY_DECODE]
    ref_key = next((k for k in exact if k[0] == ctx.target_backend), next(iter(exact or tables), None))
    if ref_key is None:
        return cells
    ref = tables[ref_key]
    tol = ctx.th("PQ2", "table_abs_diff")
    for (be, r), tab in tables.items():
        lossy = r in LOSSY_DECODE
        limit = LOSSY_DECODE[r] if lossy else tol
        ev = ctx.evidence(ID, f"{t}_{be}_{r}_table", table=tab, reference_table=ref)
        details = {"table": tab, "sigma_units": tab * np.sqrt(128), "reference_path": f"{ref_key[0]}:{ref_key[1]}"}
        # every path: a block of one index decodes to one value at every position
        spread = centroid_table_spread(ctx, be, r, t)
        ok = spread <= limit
        cells.append(ctx.cell(ID, t, be, r, "constant_block_rel_spread", spread, limit,
                              Verdict.PASS if ok else Verdict.FAIL, evidence=ev, details=details,
                              caveat="" if ok else f"a block whose indices are all equal decodes to values that differ "
                                                   f"by up to {spread:.3g} (relative) across positions"))
        if (be, r) == ref_key:
            continue  # the reference path's table is what the others are compared with
        diff = float(np.max(np.abs(tab - ref)))
        rel = float(np.max(np.abs(tab - ref) / np.maximum(np.abs(ref), 1e-30)))
        value = rel if lossy else diff
        ok = value <= limit
        cav = f"centroid table differs from {ref_key[0]}:{ref_key[1]} by up to {diff:.3g}" if not ok else (
            f"read through {r} (half-precision kernel): relative difference within its error bound" if lossy else "")
        cells.append(ctx.cell(ID, t, be, r, "table_rel_diff_vs_reference_path" if lossy else "table_abs_diff_vs_reference_path",
                              value, limit, Verdict.PASS if ok else Verdict.FAIL, caveat=cav, evidence=ev,
                              details={**details, "abs_diff": diff}))
    if len(tables) == 1:
        notes.append(
            f"{t}: one decode path in this build ({ref_key[0]}:{ref_key[1]}): no cross-path table comparison")
    return cells


def _rule_cells(ctx: Context, t: str, backend: str, route: str) -> list[Cell]:
    d = decision_thresholds(ctx, backend, route, t)
    table, thr, mids = d["table"], d["thresholds"], d["midpoints"]
    bits = T.fmt(t).bits
    opt = lloyd_max(bits, "beta", 128)
    missing = int(np.count_nonzero(np.isnan(thr)))
    thr_err = float(np.nanmax(np.abs(thr - mids))) if missing < len(thr) else float("inf")
    # the transition is located to within its last bracket: judged off the midpoint only beyond that resolution
    res = float(np.nanmax(d["resolution"])) if "resolution" in d and missing < len(thr) else 0.0
    if missing:
        thr_err = max(thr_err, 2e-3)  # no transition within the ±2e-3 window: at least that far off
    used = np.where(np.isnan(thr), mids, thr)
    dist = expected_distortion(table, used, "beta", 128)
    ratio = dist / opt.distortion
    tol_t = ctx.th("PQ2", "threshold_abs_err")
    tol_r = ctx.th("PQ2", "distortion_ratio")
    ev = ctx.evidence(ID, f"{t}_{backend}_{route}_rule", table=table, thresholds=thr, midpoints=mids,
                      lloyd_max=opt.centroids)
    sig = np.sqrt(128)
    details = {"table_sigma": table * sig, "lloyd_max_sigma": opt.centroids * sig,
               "outer_centroid_sigma": float(table[-1] * sig), "lloyd_max_outer_sigma": float(opt.centroids[-1] * sig),
               "distortion": dist, "lloyd_max_distortion": opt.distortion, "thresholds_not_found": missing}
    details["measurement_resolution"] = res
    ok_t = thr_err <= tol_t + res
    c1 = ctx.cell(ID, t, backend, route, "threshold_abs_err_vs_midpoint", thr_err, tol_t,
                  Verdict.PASS if ok_t else Verdict.FAIL,
                  caveat="" if ok_t else f"decision thresholds off the centroid midpoints by up to {thr_err:.3g}"
                  + (f" ({missing} not found within ±2e-3)" if missing else ""), evidence=ev,
                  details={**details, "rule": {"limit": tol_t + res}})  # judged at tol + resolution
    raw = Verdict.PASS if ratio <= tol_r else Verdict.PARTIAL
    cav = "" if raw == Verdict.PASS else (
        f"distortion {ratio:.3f}x the Lloyd-Max optimum; outer centroid {table[-1] * sig:.3f} sigma "
        f"vs optimum {opt.centroids[-1] * sig:.3f} sigma")
    c2 = ctx.cell(ID, t, backend, route, "distortion_ratio_vs_lloyd_max", ratio, tol_r, raw, caveat=cav,
                  evidence=ev, details=details)
    return [c1, c2]


def show_thresholds(thr: np.ndarray, which: np.ndarray, decimals: int) -> str:
    """Thresholds at the positions ``which`` as the report prints them: '±0.145561/±0.013964' where the
    table is symmetric (threshold j == -threshold k-2-j), else signed values."""
    out = []
    for j in which:
        v = float(thr[j])
        sym = np.isclose(-thr[len(thr) - 1 - j], v, rtol=0, atol=10.0 ** -decimals) and abs(v) > 10.0 ** -decimals
        txt = f"±{abs(v):.{decimals}f}" if sym else f"{v:+.{decimals}f}"
        if txt not in out:
            out.append(txt)
    return "/".join(out)


def _path_pair_cells(ctx: Context, t: str) -> list[Cell]:
    """Every two quantise paths' measured decision thresholds compared with each other (spec "Integrity of a
    verdict" / Paths against each other): two paths each within ``threshold_abs_err`` of the midpoints can
    still differ from each other, and then bytes written on one decode to other indices on the other.

    PASS: they agree within ``threshold_path_diff`` plus both measurements' resolution. PARTIAL: they differ
    by more, but each is within ``threshold_abs_err`` of the midpoints: a real but tiny difference, reported
    with its size (COMPAT counts the index flips it causes). FAIL (PARTIAL on a non-target path): they
    differ and one of them is off the midpoints (blamed on the one farther off).
    """
    meas = {}
    for backend, route in quant_paths(ctx):
        try:  # measured (and cached) by the path's own rule cells, where any failure is already reported
            meas[f"{backend}:{route}"] = decision_thresholds(ctx, backend, route, t)
        except (Unsupported, ProbeCrash, HarnessError):  # already a cell of this path's _rule_cells
            continue
    tol_p = ctx.th("PQ2", "threshold_path_diff")
    tol_t = ctx.th("PQ2", "threshold_abs_err")
    cells = []
    for a, b in itertools.combinations(sorted(meas, key=lambda p: (not ctx.is_target(*p.split(":")), p)), 2):
        ta, tb = meas[a]["thresholds"], meas[b]["thresholds"]
        both = ~np.isnan(ta) & ~np.isnan(tb)
        if not both.any():
            continue
        diff = np.where(both, np.abs(ta - tb), 0.0)
        res = np.where(both, np.nan_to_num(meas[a]["resolution"]) + np.nan_to_num(meas[b]["resolution"]), 0.0)
        worst = float(diff.max())
        over = diff > tol_p + res
        off = {p: float(np.nanmax(np.abs(meas[p]["thresholds"] - meas[p]["midpoints"]))) for p in (a, b)}
        culprit = max((a, b), key=lambda p: off[p])
        details = {"paths": [a, b], "max_abs_diff": worst, "thresholds_a": ta, "thresholds_b": tb,
                   "off_midpoint": off, "differing": int(over.sum())}
        if not over.any():
            vd, cav = Verdict.PASS, ""
        else:
            top = np.argsort(-np.where(over, diff, -1.0))[:min(2, int(over.sum()))]
            dec = max(6, int(np.ceil(-np.log10(max(float(diff[top].min()), 1e-12)))))
            size = (f"{a} thresholds {show_thresholds(ta, np.sort(top)[::-1], dec)} vs {b} "
                    f"{show_thresholds(tb, np.sort(top)[::-1], dec)}: {int(over.sum())} of {len(ta)} differ, by up to "
                    f"{worst:.2g}")
            if max(off.values()) <= tol_t + float(res.max()):
                vd, cav = Verdict.PARTIAL, (f"{size}; each within {tol_t:g} of the midpoints, but bytes written on one "
                                            f"path decode to other indices for values between the two (COMPAT counts them)")
            else:
                vd, cav = Verdict.FAIL, f"{size}; {culprit} is {off[culprit]:.2g} off the midpoints"
        be, route = culprit.split(":")
        c = ctx.cell(ID, t, be, route, "thresholds_max_abs_diff_between_paths", worst, tol_p, vd, caveat=cav,
                     details=details)
        c.path = f"{a} x {b}"
        if vd == Verdict.PARTIAL:
            c.target = ctx.is_target(*a.split(":")) or ctx.is_target(*b.split(":"))
        cells.append(c)
    return cells


def run(ctx: Context) -> Outcome:
    """PQ2 cells: table agreement per (type, decode path); thresholds and distortion per (type, quantise path);
    thresholds of every two quantise paths against each other. Notes say where only one decode path exists."""
    cells, notes = Outcome(), []
    for t in ctx.types:
        cells += _table_cells(ctx, t, notes)
        for backend, route in quant_paths(ctx):
            cells += guarded(ctx, ID, t, backend, route, lambda t=t, b=backend, r=route: _rule_cells(ctx, t, b, r))
        cells += guarded(ctx, ID, t, ctx.target_backend, "set_rows", lambda t=t: _path_pair_cells(ctx, t))
    cells.notes += notes
    return cells


CHECK = Check(ID, TITLE, run, order=20, rules="PQ2", catches={"perturbed_centroids": ("PARTIAL", "FAIL"), "thresholds_off": ("FAIL",), "decode_unrotated": ("FAIL",)})
