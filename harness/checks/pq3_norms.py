"""PQ3 Norms: the stored fp16 norm is the corrected ||x|| / ||c||, decoded vectors keep ||x||.

Measured (spec PQ3) on random rows and edge rows (all zeros, 1e-8 scale, 1e5 scale, one huge
coordinate): stored norm vs ||x||/||c|| recomputed in float64 from the stored indices (c = the
path's own centroid table), the decoded norm vs ||x||, exact zeros for zero rows, NaN/Inf. A backend that writes
a type it cannot read is judged through another backend's exact decoder (:mod:`harness.checks.readers`).
"""
from __future__ import annotations

import numpy as np

from harness.checks.contract import Check
from harness.checks.common import Context, guarded, quant_paths
from harness.checks.observations import precise_table
from harness.checks.readers import reader_of
from harness.reference import turbo as T
from harness.report.model import Cell, Verdict

ID, TITLE = "PQ3", "Norms (corrected norm, zero rows, fp16 range)"


def rows(ctx: Context, n: int) -> tuple[np.ndarray, list[str]]:
    """Random rows (Gaussian, log-uniform scales 1e-3..1e2) then the edge rows. float32 (n+5, 128)."""
    rng = ctx.rng("pq3")
    x = rng.standard_normal((n, 128)) * (10.0 ** rng.uniform(-3, 2, (n, 1)))
    edge = np.zeros((5, 128))
    edge[1] = rng.standard_normal(128) * 1e-8
    edge[2] = rng.standard_normal(128) * 1e5
    edge[3, 17] = 3e4
    edge[3, :17] = 1e-2
    edge[4] = rng.standard_normal(128)
    edge[4, 5] = 1e3
    names = ["zeros", "scale_1e-8", "scale_1e5", "one_huge", "one_large"]
    return np.vstack([x, edge]).astype(np.float32), names


def _cells(ctx: Context, t: str, backend: str, route: str) -> list[Cell]:
    n = int(ctx.th("PQ3", "rows"))
    x, edge_names = rows(ctx, n)
    raw = ctx.target.quantize(backend, route, t, x)
    idx, norms, _ = T.unpack(t, raw)
    reader = reader_of(ctx, backend, t)  # another backend's decoder when this one only writes the type
    table = precise_table(ctx, t, backend)
    c = table[idx]  # permutation of indices inside a block does not change ||c||
    xn = np.linalg.norm(x.astype(np.float64), axis=1)
    cn = np.linalg.norm(c, axis=1)
    expect = np.where(cn > 0, xn / np.where(cn > 0, cn, 1), xn)
    stored = norms.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = stored / expect
    fin = np.isfinite(expect) & (expect < 65504) & (expect > 6.1e-5)  # inside fp16's normal range
    rand = np.arange(len(x)) < n
    tol = ctx.th("PQ3", "ratio_tol")
    bad = rand & fin & ~(np.abs(ratio - 1) <= tol)
    frac = float(np.count_nonzero(bad) / max(np.count_nonzero(rand & fin), 1))
    # 1 fp16 ulp: stored must equal fp16(expect) or a neighbour
    with np.errstate(over="ignore"):  # values beyond fp16 range become Inf, as in the fork; reported below
        e16 = expect.astype(np.float16)
    ulp_ok = np.abs(stored.astype(np.float16).view(np.int16).astype(np.int32) - e16.view(np.int16).astype(np.int32)) <= 1
    ulp_bad = int(np.count_nonzero(rand & fin & ~ulp_ok))
    dec = reader.decode(ctx, raw, len(x), 128).astype(np.float64)
    dn = np.linalg.norm(dec, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dec_ratio = dn[rand & fin] / xn[rand & fin]
    bias = float(np.mean(dec_ratio) - 1.0) if dec_ratio.size else float("nan")
    nan_any = int(np.count_nonzero(~np.isfinite(stored) & np.isnan(stored))) + int(np.count_nonzero(np.isnan(dec)))
    zero_exact = bool(np.all(dec[n] == 0.0) and np.all(np.isfinite(dec[n])))
    overflow = [edge_names[i] for i in range(5) if not np.isfinite(stored[n + i])]
    caveats, raw_v = [], Verdict.PASS
    if frac > ctx.th("PQ3", "ratio_frac"):
        raw_v = Verdict.FAIL
        caveats.append(f"{frac:.2%} of groups store a norm off ||x||/||c|| by more than {tol:g}")
    if ulp_bad:
        raw_v = Verdict.FAIL
        caveats.append(f"{ulp_bad} stored norms more than 1 fp16 ulp from ||x||/||c||")
    if abs(bias) > ctx.th("PQ3", "decoded_norm_bias"):
        raw_v = Verdict.FAIL
        caveats.append(f"decoded norms are {bias:+.2%} off ||x|| on average"
                       + (" (uncorrected norm: shrunk by the codebook)" if bias < 0 else ""))
    if nan_any:
        raw_v = Verdict.FAIL
        caveats.append(f"{nan_any} NaN values from finite input")
    if not zero_exact:
        raw_v = Verdict.FAIL
        caveats.append("an all-zero row does not decode to exact zeros")
    if overflow:
        caveats.append(f"beyond fp16 range (reported, not judged): {', '.join(overflow)} store Inf")
    if reader.note:
        caveats.append(reader.note)
    ev = ctx.evidence(ID, f"{t}_{backend}_{route}", stored=stored, expected=expect, decoded_norm=dn, input_norm=xn)
    return [ctx.cell(ID, t, backend, route, "frac_groups_ratio_off", frac, ctx.th("PQ3", "ratio_frac"), raw_v,
                     caveat="; ".join(caveats), evidence=ev,
                     details={"ulp_violations": ulp_bad, "decoded_norm_bias": bias, "nan_count": nan_any,
                              "zero_row_exact": zero_exact, "overflow_rows": overflow, **reader.details(),
                              "edge_stored_norms": {edge_names[i]: float(stored[n + i]) for i in range(5)}})]


def run(ctx: Context) -> list[Cell]:
    """PQ3 cells per (type, quantise path); overflow behaviour compared across paths."""
    cells: list[Cell] = []
    for t in ctx.types:
        for backend, route in quant_paths(ctx):
            cells += guarded(ctx, ID, t, backend, route, lambda t=t, b=backend, r=route: _cells(ctx, t, b, r))
        # overflow consistency across paths of this type
        ov = {c.path: tuple(c.details.get("overflow_rows", [])) for c in cells if c.type == t and "overflow_rows" in c.details}
        if len(set(ov.values())) > 1:
            for c in cells:
                if c.type == t and c.path in ov and c.verdict == Verdict.PASS:
                    c.verdict = Verdict.FAIL if c.target else Verdict.PARTIAL
                    c.caveat = (c.caveat + "; " if c.caveat else "") + f"paths disagree on fp16 overflow: {ov}"
    return cells


CHECK = Check(ID, TITLE, run, order=30, rules="PQ3", catches={"uncorrected_norm": ("FAIL",), "nan_zero_rows": ("FAIL",)})
