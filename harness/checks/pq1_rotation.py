"""PQ1 Rotation: every path uses the same signed WHT, and the quantiser rotates as the graph op does.

Measured (spec PQ1): the op's forward/inverse matrices from the 128 basis vectors (float64 on our
side), orthogonality max|R R^T - I|, WHT structure (|R_ij| = 1/sqrt(128), signs = D2·H·D1),
inverse = transpose, round trip on random vectors, sign vectors recovered on every path, and the
indices each quantiser chooses for random rows vs the reference quantiser with the graph op's R.
"""
from __future__ import annotations

import numpy as np

from harness.checks.contract import Check
from harness.checks.common import Context, guarded, quant_paths
from harness.checks.observations import decision_thresholds, op_matrices, quantizer_rotation
from harness.checks.readers import reader_indices, reader_of
from harness.reference import turbo as T
from harness.reference.wht import canonical_signs, factor_signed_wht, signed_wht_matrix
from harness.report.model import Cell, Verdict

ID, TITLE = "PQ1", "Rotation (signed WHT, same on every path, used by the quantizer)"


def _op_cells(ctx: Context, backend: str, ref_signs) -> list[Cell]:
    om = op_matrices(ctx, backend)
    R, Rinv, fac = om["R"], om["Rinv"], om["factor"]
    half = _half_op(ctx, backend)
    tol = ctx.th("PQ1", "max_abs_err_half" if half else "max_abs_err")
    orth = float(np.max(np.abs(R @ R.T - np.eye(128))))
    inv_t = float(np.max(np.abs(Rinv - R.T)))
    x = ctx.rng("pq1-rt").standard_normal((64, 128)).astype(np.float32)
    fwd = ctx.target.wht(backend, x, 0, 128)
    back = ctx.target.wht(backend, fwd, 1, 128).astype(np.float64)
    rt = float(np.max(np.abs(back - x)) / max(np.max(np.abs(x)), 1e-30))
    lin = float(np.max(np.abs(fwd.astype(np.float64) - x.astype(np.float64) @ R.T)))
    if half:  # a half-precision op's error scales with the values: judged relative to the largest input
        lin /= max(float(np.max(np.abs(x))), 1e-30)
    value = max(orth, inv_t, rt, lin, fac["magnitude_err"])
    caveats = ["half-precision rotation op: judged with max_abs_err_half, linearity relative to the input"] if half else []
    if not fac["is_signed_wht"]:
        caveats.append(f"not a signed WHT: {fac['sign_factor_mismatches']} sign entries do not factor as D2·H·D1, "
                       f"max ||R_ij|-1/sqrt(128)| = {fac['magnitude_err']:.3g}")
    same = None
    if ref_signs is not None and fac["is_signed_wht"]:
        same = bool(np.array_equal(fac["s1"], ref_signs[0]) and np.array_equal(fac["s2"], ref_signs[1]))
        if not same:
            caveats.append("sign vectors differ from the target backend's rotation op")
    raw = Verdict.PASS if (value <= tol and fac["is_signed_wht"] and same is not False) else Verdict.FAIL
    ev = ctx.evidence(ID, f"{backend}_turbo_wht", R=R, Rinv=Rinv, s1=fac["s1"], s2=fac["s2"])
    return [ctx.cell(ID, "all", backend, "turbo_wht", "max_abs_err", value, tol, raw, caveat="; ".join(caveats),
                     evidence=ev, details={"orthogonality_err": orth, "inverse_vs_transpose_err": inv_t,
                                           "roundtrip_rel_err": rt, "linearity_err": lin,
                                           "magnitude_err": fac["magnitude_err"],
                                           "sign_mismatches": fac["sign_factor_mismatches"],
                                           "is_signed_wht": fac["is_signed_wht"], "signs_match_target": same,
                                           "s1": fac["s1"], "s2": fac["s2"]})]


def _half_op(ctx: Context, backend: str) -> bool:
    """Whether a backend's rotation op computes in half precision (its routes say so: metal-src's half4 kernel)."""
    return getattr(ctx.target.routes(backend), "wht_precision", "f32") == "f16"


def _g64_cells(ctx: Context, backend: str, signs128) -> list[Cell]:
    """The op's 64-value groups (used by the fork for heads that are not a multiple of 128): a 64-point
    signed WHT, orthogonal, inverse = transpose. Whether its signs are the first 64 of the 128-group
    signs is recorded, not judged."""
    eye = np.eye(64, dtype=np.float32)
    R = ctx.target.wht(backend, eye, 0, 64).astype(np.float64).T
    Rinv = ctx.target.wht(backend, eye, 1, 64).astype(np.float64).T
    fac = factor_signed_wht(R)
    orth = float(np.max(np.abs(R @ R.T - np.eye(64))))
    inv_t = float(np.max(np.abs(Rinv - R.T)))
    value = max(orth, inv_t, fac["magnitude_err"])
    tol = ctx.th("PQ1", "max_abs_err")
    ok = value <= tol and fac["is_signed_wht"]
    prefix = None
    if signs128 is not None and fac["is_signed_wht"]:
        a = canonical_signs(signs128[0][:64], signs128[1][:64])
        prefix = bool(np.array_equal(a[0], fac["s1"]) and np.array_equal(a[1], fac["s2"]))
    ev = ctx.evidence(ID, f"{backend}_turbo_wht_g64", R=R, Rinv=Rinv)
    c = ctx.cell(ID, "all", backend, "turbo_wht", "max_abs_err_group64", value, tol,
                 Verdict.PASS if ok else Verdict.FAIL, evidence=ev,
                 caveat="" if ok else f"64-value groups are not an orthogonal signed WHT "
                                      f"({fac['sign_factor_mismatches']} sign entries off, error {value:.3g})",
                 details={"orthogonality_err": orth, "inverse_vs_transpose_err": inv_t, "is_signed_wht": fac["is_signed_wht"],
                          "signs_are_128_prefix": prefix})
    c.path = f"{backend}:turbo_wht[g64]"
    return [c]


def _quant_cells(ctx: Context, backend: str, route: str, type_name: str, op_R, op_signs) -> list[Cell]:
    n = int(ctx.th("PQ1", "random_rows"))
    x = ctx.rng(f"pq1-{type_name}").standard_normal((n, 128)).astype(np.float32)
    reader = reader_of(ctx, backend, type_name)  # another backend's decoder when this one only writes the type
    got = reader_indices(ctx, reader, ctx.target.quantize(backend, route, type_name, x), n)
    if not np.any(got):  # what the evidence shows directly: no rotation can be read from an all-zero output
        tol = ctx.th("PQ1", "index_mismatch_frac")
        ev = ctx.evidence(ID, f"{type_name}_{backend}_{route}", indices=got)
        return [ctx.cell(ID, type_name, backend, route, "nonzero_index_frac", 0.0, 0.0, Verdict.FAIL, op=">",
                         caveat="; ".join(s for s in (
                             f"the quantiser writes no indices (all zero): every one of the {got.size} indices it "
                             f"stored for {n} random rows is 0", reader.note) if s), evidence=ev,
                         details={"cause": "zero_indices", "indices": int(got.size), **reader.details()})]
    qr = quantizer_rotation(ctx, backend, route, type_name)
    caveats = []
    if not qr["is_signed_wht"]:
        caveats.append(f"quantizer rotation is not a signed WHT ({qr['sign_factor_mismatches']} sign entries off)")
    elif op_signs is not None and not (np.array_equal(qr["s1"], op_signs[0]) and np.array_equal(qr["s2"], op_signs[1])):
        caveats.append("quantizer sign vectors differ from the graph op's" + (
            " (or its index order inside a block differs from the layout the reader decodes: the bytes alone cannot "
            "tell the two apart; PQ4 says which)" if reader.foreign else ""))
    # index agreement on random rows (got, above) vs the reference quantiser with the graph op's rotation
    thr = decision_thresholds(ctx, backend, route, type_name)
    t = np.where(np.isnan(thr["thresholds"]), thr["midpoints"], thr["thresholds"])
    ref_idx, _, y = T.quantize(x, op_R, thr["table"], t)
    dis = got != ref_idx
    eps = ctx.th("general", "boundary_flip_abs")
    near = np.min(np.abs(y[..., None] - t[None, None, :]), axis=-1) < eps
    real = int(np.count_nonzero(dis & ~near))
    flips = int(np.count_nonzero(dis & near))
    frac = real / dis.size
    tol = ctx.th("PQ1", "index_mismatch_frac")
    raw = Verdict.PASS if (frac <= tol and not caveats) else Verdict.FAIL
    if frac > tol:
        caveats.append(f"{real} of {dis.size} indices differ from the reference quantizer using the graph op's rotation")
    if reader.note:
        caveats.append(reader.note)
    ev = ctx.evidence(ID, f"{type_name}_{backend}_{route}", indices=got, ref_indices=ref_idx, s1=qr["s1"], s2=qr["s2"])
    return [ctx.cell(ID, type_name, backend, route, "real_index_mismatch_frac", frac, tol, raw,
                     caveat="; ".join(caveats), evidence=ev,
                     details={"real_mismatches": real, "boundary_flips": flips, "quantizer_is_signed_wht": qr["is_signed_wht"],
                              "quantizer_sign_mismatches": qr["sign_factor_mismatches"], **reader.details()})]


def run(ctx: Context) -> list[Cell]:
    """PQ1 cells: one per backend for the rotation op, one per (type, quantise path)."""
    cells: list[Cell] = []
    ref_signs = None
    order = sorted(ctx.backends(), key=lambda b: b.name != ctx.target_backend)  # target first
    op = {}
    for b in order:
        def one(b=b):
            nonlocal ref_signs
            om = op_matrices(ctx, b.name)
            if b.name == ctx.target_backend and om["factor"]["is_signed_wht"]:
                ref_signs = (om["factor"]["s1"], om["factor"]["s2"])
            op[b.name] = om
            return _op_cells(ctx, b.name, ref_signs if b.name != ctx.target_backend else None)
        cells += guarded(ctx, ID, "all", b.name, "turbo_wht", one)
        if 64 not in ctx.target.routes(b.name).wht_groups:  # e.g. Metal's kernel_turbo_wht: 128-value groups only
            continue
        cells += guarded(ctx, ID, "all", b.name, "turbo_wht[g64]", lambda b=b: _g64_cells(
            ctx, b.name, (op[b.name]["factor"]["s1"], op[b.name]["factor"]["s2"]) if b.name in op else None))
    for t in ctx.types:
        for backend, route in quant_paths(ctx):
            om = op.get(backend) or op.get(ctx.target_backend)
            if om is None:
                cells.append(Cell(ID, t, f"{backend}:{route}", "-", None, None, Verdict.SKIP,
                                  caveat="no rotation op measured on this build: cannot compare the quantizer with it",
                                  target=ctx.is_target(backend, route)))
                continue
            signs = (om["factor"]["s1"], om["factor"]["s2"]) if om["factor"]["is_signed_wht"] else None
            # a half-precision op's matrix carries fp16 rounding; the exact signed WHT of its signs is the reference
            R = signed_wht_matrix(*signs) if signs is not None and backend in op and _half_op(ctx, backend) else om["R"]
            cells += guarded(ctx, ID, t, backend, route,
                             lambda backend=backend, route=route, t=t, R=R, signs=signs:
                             _quant_cells(ctx, backend, route, t, R, signs))
    return cells


CHECK = Check(ID, TITLE, run, order=10, rules="PQ1", catches={"dense_rotation": ("FAIL",), "quantizer_signs": ("FAIL",),
                                                             "zero_indices": ("FAIL",)})
