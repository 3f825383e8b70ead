"""PQ6 Attention: flash attention with turbo K/V, as the fork's graph runs it, vs exact attention.

Per backend: K and V are written by that backend's own quantiser (set_rows); Q is rotated with the
backend's rotation op when K is turbo and the output inverse-rotated when V is turbo (the fork's
llama graph does the same); head_dim 64 is zero-padded to 128 as the fork's KV cache does.
Reference: the same bytes decoded by the reference decoder (the path's own centroid table),
exact softmax attention in float64 in the original domain (K, V un-rotated with the quantiser's
rotation), sliced back to the real head_dim. Ablations (no Q rotation, no output inverse) must be
far off. Cases: turbo/turbo, q8_0-K + turbo-V, turbo-K + q8_0-V, mixed turbo types, GQA,
head_dim 64/128/256, one query row (decode kernel) and many (prefill).
"""
from __future__ import annotations

import numpy as np

from harness.checks.contract import Check, Outcome
from harness.checks.common import Context, guarded
from harness.checks.observations import op_matrices, precise_table, quantizer_rotation
from harness.errors import ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.attention import attention, relative_error
from harness.report.model import Cell, Verdict

ID, TITLE = "PQ6", "Attention (flash attention with turbo K/V vs exact)"


def cases(types: list[str], software: bool = False) -> list[dict]:
    """The case list: dicts with tk, tv, D (real head_dim), n_q, n_head, n_head_kv, ablate.

    ``software``: the list for a software device (lavapipe runs flash attention on the CPU, seconds per call):
    every head_dim class once with one query row, the prefill shape (8 rows) once at D=128 with its ablations,
    q8_0 beside each turbo type once each way, and the mixed pairs with one query row.
    """
    if software:
        return [c for c in cases(types) if c["n_q"] == 1 or c["ablate"]]
    out = []
    for t in types:
        for D in (64, 128, 256):
            for nq in (1, 8):
                out.append(dict(tk=t, tv=t, D=D, n_q=nq, n_head=4, n_head_kv=2, ablate=(D == 128 and nq == 8)))
        for nq in (1, 8):
            out.append(dict(tk="q8_0", tv=t, D=128, n_q=nq, n_head=4, n_head_kv=2, ablate=False))
            out.append(dict(tk=t, tv="q8_0", D=128, n_q=nq, n_head=4, n_head_kv=2, ablate=False))
    mixed = [(a, b) for a, b in (("turbo4", "turbo3"), ("turbo3", "turbo2"), ("turbo2", "turbo4")) if a in types and b in types]
    for a, b in mixed:
        for nq in (1, 8):
            out.append(dict(tk=a, tv=b, D=128, n_q=nq, n_head=4, n_head_kv=1, ablate=False))
    return out


def label(c: dict) -> str:
    """Short case label used in cell paths, e.g. 'turbo3/q8_0 D=128 nq=8 h=4/2'."""
    return f"{c['tk']}/{c['tv']} D={c['D']} nq={c['n_q']} h={c['n_head']}/{c['n_head_kv']}"


def _rotation(ctx: Context, backend: str, tname: str) -> np.ndarray:
    qr = quantizer_rotation(ctx, backend, "set_rows", tname)
    return qr["R"] if qr["R"] is not None else op_matrices(ctx, backend)["R"]


def kernel_precision(ctx: Context, backend: str) -> dict:
    """Measure the backend's flash-attention arithmetic on f16 K/V (exactly representable inputs):
    its relative error vs exact attention is the kernel's own rounding. Above the f32 tolerance the
    kernel is treated as half precision and judged at rel_err_half, reported as such."""
    def measure():
        try:
            return measure_f16()
        except (Unsupported, ProbeCrash) as e:  # no f16 flash attention: judge strictly and say the baseline is missing
            # (a crash of the f16 baseline is not blamed on the turbo cells judged with it)
            return {"f16_kv_rel_err": None, "half": False, "tol": ctx.th("PQ6", "rel_err_f32"),
                    "note": f"kernel precision not measured ({e})"}

    def measure_f16():
        rng = np.random.default_rng(11)
        q = rng.standard_normal((4, 8, 128)).astype(np.float32)
        k = (2.5 * rng.standard_normal((2, 256, 128))).astype(np.float16)
        v = rng.standard_normal((2, 256, 128)).astype(np.float16)
        out = ctx.target.flash_attn(backend, "f16", k.view(np.uint8).reshape(-1), "f16", v.view(np.uint8).reshape(-1),
                                    q, 128, 128, 256, 2, 1 / np.sqrt(128), False, False, 128, True)
        err = relative_error(out, attention(q, k.astype(np.float64), v.astype(np.float64), 1 / np.sqrt(128)))
        half = err > ctx.th("PQ6", "rel_err_f32")
        return {"f16_kv_rel_err": err, "half": half,
                "tol": ctx.th("PQ6", "rel_err_half") if half else ctx.th("PQ6", "rel_err_f32")}
    return ctx.cached(("fa_precision", backend), measure)


def _pad(a: np.ndarray, Dp: int) -> np.ndarray:
    if a.shape[-1] == Dp:
        return a
    out = np.zeros(a.shape[:-1] + (Dp,), np.float32)
    out[..., :a.shape[-1]] = a
    return out


def _case(ctx: Context, backend: str, c: dict) -> list[Cell]:
    tk, tv, D, nq, nh, nkv = c["tk"], c["tv"], c["D"], c["n_q"], c["n_head"], c["n_head_kv"]
    n_kv = int(ctx.th("PQ6", "n_kv"))
    turbo_k, turbo_v = tk in T.FORMATS, tv in T.FORMATS
    Dp = -(-D // 128) * 128 if (turbo_k or turbo_v) else D
    rng = ctx.rng(f"pq6-{label(c)}")
    q = rng.standard_normal((nh, nq, D)).astype(np.float32)
    # turbo K: a peaked softmax (logit std ~2.5) so that a missing rotation is grossly visible; non-turbo K:
    # unit scale, since kernels round Q to K's dot type (q8_0 on CPU) and larger logits amplify that rounding
    k = ((2.5 if turbo_k else 1.0) * rng.standard_normal((nkv, n_kv, D))).astype(np.float32)
    v = rng.standard_normal((nkv, n_kv, D)).astype(np.float32)
    qp, kp, vp = _pad(q, Dp), _pad(k, Dp), _pad(v, Dp)
    kraw = ctx.target.quantize(backend, "set_rows", tk, kp.reshape(-1, Dp))
    vraw = ctx.target.quantize(backend, "set_rows", tv, vp.reshape(-1, Dp))
    scale = 1.0 / np.sqrt(D)
    tables = {t: precise_table(ctx, t, backend) for t in {tk, tv} if t in T.FORMATS}
    kd = T.decode_any(tk, kraw, nkv * n_kv, Dp, tables).reshape(nkv, n_kv, Dp).astype(np.float64)
    vd = T.decode_any(tv, vraw, nkv * n_kv, Dp, tables).reshape(nkv, n_kv, Dp).astype(np.float64)
    if turbo_k:
        Rk = _rotation(ctx, backend, tk)
        kd = (kd.reshape(-1, 128) @ Rk).reshape(kd.shape)  # R^T applied to each 128-group
    if turbo_v:
        Rv = _rotation(ctx, backend, tv)
        vd = (vd.reshape(-1, 128) @ Rv).reshape(vd.shape)
    ref = attention(qp, kd, vd, scale)[..., :D]

    def run_fa(rot_q, inv_out):
        out = ctx.target.flash_attn(backend, tk, kraw, tv, vraw, qp, Dp, Dp, n_kv, nkv, scale, rot_q, inv_out, 128, True)
        return out[..., :D]

    out = run_fa(turbo_k, turbo_v)
    err = relative_error(out, ref)
    prec = kernel_precision(ctx, backend)
    tol = prec["tol"]
    fail_at = ctx.th("PQ6", "rel_err_fail")
    cav = (f"half-precision kernel (f16 K/V baseline error {prec['f16_kv_rel_err']:.2g}): judged at {tol:g}"
           if prec["half"] else "")
    if not turbo_k and tk in T.CLASSIC_DECODERS:
        # ggml's CPU kernel rounds Q to K's dot type (q8_0) before the dot product; a reference that does
        # the same separates that design choice from a real error. Kernels that convert Q otherwise get the
        # quantized-Q tolerance against the exact reference.
        q_r = T.decode_any(tk, T.quantize_classic(tk, qp), nh * nq, Dp).reshape(qp.shape)
        err_r = relative_error(out, attention(q_r, kd, vd, scale)[..., :D])
        if err_r <= tol:
            err, cav = err_r, f"reference rounds Q to {tk} as the kernel does (error vs unrounded Q: {err:.2g})"
        else:
            tol = max(tol, ctx.th("PQ6", "rel_err_quantized_q"))
            cav = f"kernel converts Q before the dot product; judged at {tol:g}"
    raw_v = Verdict.PASS if err <= tol else (Verdict.PARTIAL if err <= fail_at else Verdict.FAIL)
    if raw_v != Verdict.PASS:
        cav = f"relative error {err:.3g} vs exact attention on the same bytes" + (f" ({cav})" if cav else "")
    ev = ctx.evidence(ID, f"{backend}_{label(c).replace(' ', '_').replace('=', '')}", out=out, ref=ref)
    lab = label(c)
    cells = [ctx.cell(ID, f"{tk}/{tv}", backend, "flash_attn", "rel_err", err, tol, raw_v, caveat=cav, evidence=ev,
                      details={"case": lab, **c})]
    cells[0].path = f"{backend}:flash_attn[{lab}]"
    if c["ablate"]:
        for name, args in (("no_q_rotation", (False, turbo_v)), ("no_output_inverse", (turbo_k, False))):
            a_out = run_fa(*args)
            a_err = relative_error(a_out, ref)
            amin = ctx.th("PQ6", "ablation_min")
            ok = a_err > amin
            cell = ctx.cell(ID, f"{tk}/{tv}", backend, "flash_attn", f"ablation_{name}_rel_err", a_err, amin,
                            Verdict.PASS if ok else Verdict.FAIL, op=">=",
                            caveat="" if ok else f"ablation {name} changes the output by only {a_err:.3g}: "
                                                 "the rotation is not where the graph expects it",
                            details={"case": lab},
                            evidence=ctx.evidence(ID, f"{backend}_{lab.replace(' ', '_').replace('=', '')}_{name}", out=a_out, ref=ref))
            cell.path = f"{backend}:flash_attn[{lab} ablation {name}]"
            cells.append(cell)
    return cells


def run(ctx: Context) -> Outcome:
    """PQ6 cells per backend x case (+ ablation cells)."""
    cells = Outcome()
    for b in ctx.backends():
        r = ctx.target.routes(b.name)
        if not r.attention:  # e.g. metal-src: device code run on the host has no flash attention
            cells.notes.append(f"{b.name}: flash attention not examined: {r.attention_note or 'the backend has none'}")
            continue
        for c in cases(ctx.types, b.software):
            got = guarded(ctx, ID, f"{c['tk']}/{c['tv']}", b.name, "flash_attn", lambda b=b, c=c: _case(ctx, b.name, c),
                          case=f"{label(c)} on {b.name}")
            for cell in got:
                if cell.path == f"{b.name}:flash_attn":
                    cell.path = f"{b.name}:flash_attn[{label(c)}]"
            cells += got
    return cells


CHECK = Check(ID, TITLE, run, order=60, rules="PQ6", catches={"no_output_inverse": ("FAIL",), "skip_q_rotation": ("FAIL",), "crash_attention": ("FAIL",)})
