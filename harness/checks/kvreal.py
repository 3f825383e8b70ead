"""KVREAL: PQ5's distortion and the attention error on the K/V vectors a real model writes, per layer.

Spec "Real models and long context" (Real K/V) and PQ5. The model (``$TURBO_MODEL`` or ``check KVREAL --model``:
``smollm2`` (default), ``gemma3`` or a GGUF path; checks/models.toml) runs a few hundred corpus tokens through the fork's own llama
API (``harness/fork/kvcapture.c``, f16 cache, one batch); the Q, K and V tensors after RoPE are
captured per layer. Rows are head vectors: float32 (tokens x heads, head_dim), zero-padded to a
multiple of 128 as the fork pads its turbo caches (head_dim 64 -> 128; 256 = two 128-groups).

Each type (turbo2/3/4, q4_0, q8_0) quantises each layer's K and V on four paths:
  fork   the target backend's KV write (set_rows), decoded by the backend, rotation undone by the
         fork's own inverse op (PQ5's path); q4_0/q8_0 bytes decoded by the reference decoders;
  ref    the harness's reference quantiser (reference/turbo.quantize: the fork's measured rotation op
         and centroid table, midpoint thresholds, fp16 corrected norm), decoded and un-rotated in NumPy;
  lloyd  the reference quantiser with the Lloyd-Max table for Beta(63.5, 63.5) (the paper's codebook);
  norot  the reference quantiser with no rotation (identity): shows what the rotation buys on this data;
  randrot the reference quantiser with random sign vectors (NMSE only, median/min/max over a few draws):
         shows whether the fork's fixed signs are unlucky on a layer.
Metrics per (layer, side, type, path): PQ5's NMSE / cosine / inner-product bias and spread on the real
coordinates (pq5_distortion.metrics), NMSE over the stored (padded) coordinates, and the attention
error: relative error of the causal attention output softmax(s Q K^T) V (s = 1/sqrt(head_dim), float64)
when only K is quantised (side K) or only V (side V), so both sides are in the same units; for K also
the logit error rms(L_hat - L) / rms(L - rowmean L) over causal pairs and the mean softmax KL.

Cells: per (turbo type, side) the worst layer's NMSE over the NMSE of Gaussian rows of the same
shape on the same path, judged with PQ5's rules ([KVREAL] in checks/thresholds.toml); per (type,
side) the fork path's agreement with the reference quantiser (max over layers of |NMSE ratio - 1|).
Evidence: per-layer statistics (norms, per-channel scale max/median, kurtosis before/after rotation),
the per-layer metric arrays, the capture summary (tokens, ops) and a plot of NMSE and attention error
per layer.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.checks.contract import Check, Outcome
from harness.checks.common import Context
from harness.checks.observations import precise_table
from harness.checks.pq5_distortion import metrics
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.lloydmax import lloyd_max, turboquant_upper_bound
from harness.reference.wht import signed_wht_matrix
from harness.report.model import Cell, Verdict
from harness.checks.kvreal_math import (CLASSIC, SIDES, PATHS_TURBO, PATHS_CLASSIC, G, padded_width, pad_heads,  # noqa: F401
    pearson_kurtosis, vector_stats, causal_attention, attention_errors, exact_attention, nmse, reference_roundtrip,
    fork_roundtrip, fork_rotation, openblas_threads, SingleThreadedBlas)
from harness.checks.kvreal_report import loss_notes, per_layer_tables, markdown_tables, plot  # noqa: F401

ID, TITLE = "KVREAL", "Real K/V per layer (distortion and attention error on a model's own vectors)"
def analyse(ctx: Context, q: dict, k: dict, v: dict, label: str = "model") -> dict:
    """:func:`_analyse` with BLAS on one thread (see :class:`SingleThreadedBlas`)."""
    with SingleThreadedBlas():
        return _analyse(ctx, q, k, v, label)


def _analyse(ctx: Context, q: dict, k: dict, v: dict, label: str = "model") -> dict:
    """Quantise every layer's K and V on every path and measure distortion and attention error.

    Args:
        q, k, v: {layer: float32 (T, H, D)} (q: n_head heads; k, v: n_head_kv heads; same D for K and V).
        label: the model's short name (for evidence names).
    Returns:
        {'layers': [...], 'types': [...], 'res': {(path, type, side): {metric: float64 (n_layers,)}},
         'gauss': {(path, type): nmse on Gaussian rows of the same shape}, 'stats': {side: {stat: (n_layers,)}},
         'errors': {(path, type): message}, 'rotation': description, 'head_dim': D, 'padded': Dp}.
    """
    layers = sorted(set(k) & set(v))
    types = [t for t in ctx.types if t in T.FORMATS] + list(CLASSIC)
    tb = ctx.target_backend
    R, rot_desc = fork_rotation(ctx, tb)
    D = k[layers[0]].shape[-1]
    Dp = padded_width(D)
    scale = 1.0 / np.sqrt(D)
    tables = {}
    for t in types:
        if t in T.FORMATS:
            try:
                tables[t] = np.sort(precise_table(ctx, t, tb))
            except (Unsupported, ProbeCrash, HarnessError) as e:
                tables[t] = e
    # all layers' K and V as one block of 128-groups per type (one probe call per type and path)
    blocks, spans, off = [], {}, 0
    for il in layers:
        for side, src in (("K", k), ("V", v)):
            gp = pad_heads(src[il]).reshape(-1, G)
            spans[(il, side)] = (off, off + len(gp))
            off += len(gp)
            blocks.append(gp)
    allg = np.concatenate(blocks)
    n_gauss = int(ctx.th("KVREAL", "gaussian_rows"))
    gx = ctx.rng("kvreal-gauss").standard_normal((n_gauss, 1, D)).astype(np.float32)
    gg = pad_heads(gx).reshape(-1, G)
    eye = np.eye(G)

    def roundtrip(path, t, x):
        if path == "fork":
            return fork_roundtrip(ctx, tb, t, x)
        if t in CLASSIC:
            return reference_roundtrip(t, x, None, None)
        if isinstance(tables.get(t), Exception):
            raise tables[t]
        if path == "ref":
            return reference_roundtrip(t, x, R, tables[t])
        if path == "lloyd":
            return reference_roundtrip(t, x, R, lloyd_max(T.fmt(t).bits, "beta", G).centroids)
        return reference_roundtrip(t, x, eye, tables[t])  # norot

    res, gauss, errors, decoded = {}, {}, {}, {}
    for t in types:
        for path in (PATHS_CLASSIC if t in CLASSIC else PATHS_TURBO):
            try:
                xh = roundtrip(path, t, np.concatenate([allg, gg]))
            except (Unsupported, ProbeCrash, HarnessError) as e:
                errors[(path, t)] = str(e)
                continue
            gh = xh[len(allg):].reshape(n_gauss, 1, Dp)[..., :D].reshape(n_gauss, D)
            gauss[(path, t)] = metrics(gx.reshape(n_gauss, D), gh, ctx.rng("kvreal-ip"))["nmse"]
            decoded[(path, t)] = xh[:len(allg)]
    # the same reference quantiser with random sign vectors: is the fork's fixed rotation unlucky on some layer?
    n_rand = int(ctx.th("KVREAL", "random_rotations"))
    for t in types:
        if t in CLASSIC or isinstance(tables.get(t), Exception) or n_rand <= 0:
            continue
        per = {side: [] for side in SIDES}
        for draw in range(n_rand):
            s1, s2 = ctx.rng(f"kvreal-rot{draw}").choice([-1.0, 1.0], (2, G))
            xh = reference_roundtrip(t, allg, signed_wht_matrix(s1, s2), tables[t])
            for side in SIDES:
                per[side].append([nmse(allg[a:b], xh[a:b]) for il in layers for a, b in [spans[(il, side)]]])
        for side in SIDES:
            arr = np.asarray(per[side])  # (draws, layers)
            res[("randrot", t, side)] = {"nmse": np.median(arr, 0), "nmse_min": arr.min(0), "nmse_max": arr.max(0)}
    exact = {il: exact_attention(q[il], k[il], v[il], scale) for il in layers if il in q}
    for (path, t), xh in decoded.items():
        for side in SIDES:
            rows = {m: [] for m in ("nmse", "nmse_stored", "cosine", "ip_bias", "ip_spread", "attn_rel_err",
                                    "logit_rel_err", "softmax_kl", "decoded_rel_diff_vs_ref")}
            for il in layers:
                src = k if side == "K" else v
                x = src[il]
                a, b = spans[(il, side)]
                hp = xh[a:b].reshape(x.shape[:-1] + (Dp,))
                h = hp[..., :D]
                m = metrics(x.reshape(-1, D), h.reshape(-1, D), ctx.rng("kvreal-ip"))
                for key in ("nmse", "cosine", "ip_bias", "ip_spread"):
                    rows[key].append(m[key])
                xp = pad_heads(x).astype(np.float64)
                rows["nmse_stored"].append(float(np.sum((hp - xp) ** 2) / max(np.sum(xp ** 2), 1e-30)))
                ae = {}
                if path == "fork" and il in exact:  # attention on the path under test only (the others agree or are ablations)
                    ae = attention_errors(q[il], k[il], v[il], h if side == "K" else None, h if side == "V" else None,
                                          scale, exact[il])
                rows["attn_rel_err"].append(ae.get(f"attn_rel_err_{side}", np.nan))
                rows["logit_rel_err"].append(ae.get("logit_rel_err", np.nan))
                rows["softmax_kl"].append(ae.get("softmax_kl", np.nan))
                ref = decoded.get(("ref", t))
                if path == "fork" and ref is not None:
                    d = ref[a:b].reshape(hp.shape)[..., :D].astype(np.float64) - h
                    rows["decoded_rel_diff_vs_ref"].append(float(np.linalg.norm(d) / max(np.linalg.norm(x), 1e-30)))
                else:
                    rows["decoded_rel_diff_vs_ref"].append(np.nan)
            res[(path, t, side)] = {kk: np.asarray(vv, np.float64) for kk, vv in rows.items()}
    stats = {side: {} for side in SIDES}
    for side, src in (("K", k), ("V", v)):
        per = [vector_stats(src[il], R) for il in layers]
        for key in per[0]:
            stats[side][key] = np.asarray([p[key] for p in per])
    return {"layers": layers, "types": types, "res": res, "gauss": gauss, "stats": stats, "errors": errors,
            "rotation": rot_desc, "head_dim": D, "padded": Dp, "label": label}


# ----------------------------------------------------------------------------- cells

def _path_label(ctx: Context, side: str, label: str) -> str:
    return f"{ctx.target_backend}:set_rows[{side} {label}]"


def _summary_cell(ctx: Context, A: dict, t: str, side: str, ev: list[str]) -> Cell:
    """Worst layer's NMSE over the same path's Gaussian NMSE, judged with PQ5's rules."""
    layers, res = A["layers"], A["res"]
    path = _path_label(ctx, side, A["label"])
    r = res.get(("fork", t, side))
    if r is None or ("fork", t) not in A["gauss"]:
        why = A["errors"].get(("fork", t), "fork path not measured")
        return Cell(ID, t, path, "-", None, None, Verdict.ERROR, caveat=why, target=True)
    g = A["gauss"][("fork", t)]
    ratio = r["nmse"] / g
    w = int(np.nanargmax(ratio))
    worst_ratio = float(ratio[w])
    bound = turboquant_upper_bound(T.fmt(t).bits)
    ok, fail = ctx.th("KVREAL", "real_over_gaussian"), ctx.th("KVREAL", "real_over_gaussian_fail")
    worst_stored = float(np.nanmax(r["nmse_stored"]))
    cav = [f"worst layer {layers[w]}: NMSE {r['nmse'][w]:.4g} = {worst_ratio:.2f}x Gaussian rows ({g:.4g})"]
    if not np.all(np.isfinite(r["nmse"])) or worst_stored > bound or worst_ratio > fail:
        raw = Verdict.FAIL
        if worst_stored > bound:
            cav.append(f"stored-coordinate NMSE {worst_stored:.4g} above TurboQuant's bound {bound:.4g}"
                       + (" (Gaussian rows too: the path's codebook, see PQ2/PQ5, not this model's data)" if g > bound else ""))
        elif worst_ratio > fail:
            cav.append("strongly data-dependent on this model's vectors")
    elif worst_ratio > ok:
        raw = Verdict.PARTIAL
        cav.append(f"real vectors above {ok:g}x Gaussian")
    else:
        raw = Verdict.PASS
    rr = res.get(("randrot", t, side))
    if rr is not None and r["nmse"][w] > rr["nmse_max"][w] * 1.01:
        cav.append(f"on layer {layers[w]} the fork's fixed sign vectors do worse than every one of "
                   f"{ctx.th('KVREAL', 'random_rotations')} random signed WHTs (NMSE {rr['nmse_min'][w]:.4g}..{rr['nmse_max'][w]:.4g})")
    ae = r["attn_rel_err"]
    wa = int(np.nanargmax(ae))
    cav.append(f"attention error worst at layer {layers[wa]} ({ae[wa]:.3g})")
    per_layer = {f"{p}_{m}": res[(p, tt, s)][m] for (p, tt, s) in res if tt == t and s == side
                 for m in ("nmse", "attn_rel_err") if m in res[(p, tt, s)]}
    for c in CLASSIC:
        if ("fork", c, side) in res:
            per_layer[f"{c}nmse"] = res[("fork", c, side)]["nmse"]
            per_layer[f"{c}_attn_rel_err"] = res[("fork", c, side)]["attn_rel_err"]
    norot = res.get(("norot", t, side))
    if rr is not None:
        per_layer["random_rotation_nmse_median"] = rr["nmse"]
        per_layer["random_rotation_nmse_max"] = rr["nmse_max"]
    details = {"layers": layers, "worst_layer": layers[w], "gaussian_nmse": g, "upper_bound": bound,
               "nmse_over_gaussian": ratio, "worst_layer_attention": layers[wa],
               "mean_nmse": float(np.mean(r["nmse"])), "mean_attn_rel_err": float(np.mean(ae)),
               "mean_cosine": float(np.mean(r["cosine"])), "mean_ip_bias": float(np.mean(r["ip_bias"])),
               "mean_ip_spread": float(np.mean(r["ip_spread"])),
               "rotation_gain": (norot["nmse"] / r["nmse"]) if norot is not None else None,
               "head_dim": A["head_dim"], "stored_width": A["padded"], **per_layer}
    return _with_path(ctx.cell(ID, t, ctx.target_backend, "set_rows", "worst_layer_nmse_over_gaussian", worst_ratio, ok,
                               raw, caveat="; ".join(cav), evidence=ev, details=details), path)


def _with_path(c: Cell, path: str) -> Cell:
    c.path = path
    return c


def _agreement_cell(ctx: Context, A: dict, t: str, side: str, ev: list[str]) -> Cell:
    """The fork path's NMSE vs the reference quantiser's on the same vectors, worst layer."""
    layers, res = A["layers"], A["res"]
    path = _path_label(ctx, side, A["label"])
    f, r = res.get(("fork", t, side)), res.get(("ref", t, side))
    if f is None or r is None:
        why = A["errors"].get(("fork", t)) or A["errors"].get(("ref", t)) or "not measured"
        return Cell(ID, t, path, "-", None, None, Verdict.ERROR, caveat=why, target=True)
    dev = np.abs(f["nmse"] / r["nmse"] - 1.0)
    w = int(np.nanargmax(dev))
    tol = ctx.th("KVREAL", "fork_vs_reference")
    val = float(dev[w])
    raw = Verdict.PASS if np.isfinite(val) and val <= tol else Verdict.FAIL
    cav = "" if raw == Verdict.PASS else (
        f"layer {layers[w]}: fork NMSE {f['nmse'][w]:.4g} vs reference {r['nmse'][w]:.4g}: the fork's quantiser "
        f"does not do what the reference does on this model's vectors")
    details = {"layers": layers, "worst_layer": layers[w], "fork_nmse": f["nmse"], "ref_nmse": r["nmse"],
               "decoded_rel_diff_vs_ref": f["decoded_rel_diff_vs_ref"],
               "max_decoded_rel_diff": float(np.nanmax(f["decoded_rel_diff_vs_ref"]))}
    if ("lloyd", t, side) in res:
        details["lloyd_max_nmse"] = res[("lloyd", t, side)]["nmse"]
    return _with_path(ctx.cell(ID, t, ctx.target_backend, "set_rows", "fork_vs_reference_nmse", val, tol, raw,
                               caveat=cav, evidence=ev, details=details), path)


def cells_from_analysis(ctx: Context, A: dict, capture_info: dict | None = None) -> Outcome:
    """Cells, evidence (npz + plot) and the per-layer tables of one analysis."""
    lab = A["label"]
    arrays = {f"{p}__{t}__{s}__{m}": v for (p, t, s), r in A["res"].items() for m, v in r.items()}
    arrays.update({f"stats__{s}__{m}": v for s, d in A["stats"].items() for m, v in d.items()})
    arrays.update({f"gaussian_nmse__{p}__{t}": v for (p, t), v in A["gauss"].items()})
    arrays["layers"] = np.asarray(A["layers"])
    ev = ctx.evidence(ID, f"{lab}_per_layer", **arrays)
    ev_stats = ctx.evidence(ID, f"{lab}_vector_stats", layers=np.asarray(A["layers"]),
                            **{f"{s}__{m}": v for s, d in A["stats"].items() for m, v in d.items()})
    png = None
    if ctx.evidence_dir is not None:
        p = plot(A, Path(ctx.evidence_dir) / ID / f"{lab}_per_layer.png")
        png = f"evidence/{ID}/{p.name}" if p else None
    evs = ev + ev_stats + ([png] if png else [])
    cells = Outcome(tables=per_layer_tables(A, capture_info, png or ""))
    for t in A["types"]:
        for side in SIDES:
            if t in T.FORMATS:
                cells.append(_summary_cell(ctx, A, t, side, evs))
            cells.append(_agreement_cell(ctx, A, t, side, ev))
    return cells


# ----------------------------------------------------------------------------- run

def run(ctx: Context) -> Outcome:
    """Capture the model's K/V (SKIP when no model, corpus or fork build is available), then analyse."""
    from harness.fork.kvcapture import NoModel, resolve_model
    from harness.runners.inputs import default_corpus
    notes: list[str] = []
    path = f"{ctx.target_backend}:set_rows"

    def skip(why: str) -> list[Cell]:
        return [Cell(ID, "all", path, "-", None, None, Verdict.SKIP, caveat=why, target=True)]
    if not ctx.target.runs_models:
        return skip("needs a fork build to run a model (this target has none)")
    try:
        corpus = default_corpus()
    except HarnessError as e:
        return skip(f"no corpus: {e}")
    try:
        model, label = resolve_model((ctx.options.get(ID) or {}).get("model"))  # None: $TURBO_MODEL
    except NoModel as e:
        return skip(f"no model: {e}")
    except HarnessError as e:
        return [Cell(ID, "all", path, "-", None, None, Verdict.ERROR, caveat=f"model: {e}", target=True)]
    n_tok = int(os.environ.get("TURBO_KVREAL_TOKENS") or ctx.th("KVREAL", "tokens"))
    t0 = time.time()
    try:
        ctx.target.kv_capture_tool()  # compiled by the target (cached), so that its time is not the capture's
    except HarnessError as e:
        return skip(f"cannot build the K/V capture tool: {e}")
    tmp = tempfile.mkdtemp(prefix="turbo-kvreal-")
    try:
        try:
            cap = ctx.target.capture_kv(model, corpus, n_tok, Path(tmp), timeout_s=float(ctx.th("KVREAL", "timeout_s")))
        except (ProbeCrash, HarnessError) as e:
            return [Cell(ID, "all", path, "-", None, None, Verdict.ERROR, caveat=f"K/V capture: {e}", target=True)]
        if ctx.evidence_dir is not None:
            d = Path(ctx.evidence_dir) / ID
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "capture.json", d / f"{label}_capture.json")
        t1 = time.time()
        kd = {il: a.shape[-1] for il, a in cap.k.items()}
        if len(set(kd.values())) != 1 or any(cap.v[il].shape[-1] != kd[il] for il in cap.layers):
            return skip(f"K/V head widths differ between layers or sides ({sorted(set(kd.values()))}): not supported yet")
        A = analyse(ctx, cap.q, cap.k, cap.v, label)
        cells = cells_from_analysis(ctx, A, cap.info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t2 = time.time()
    info = cap.info
    notes.append(f"model {label} ({Path(model).name}): {info.get('arch')}, {len(A['layers'])} layers, n_head {info.get('n_head')}, "
                 f"n_head_kv {info.get('n_head_kv')}, head_dim {A['head_dim']}"
                 + (f" zero-padded to {A['padded']} in turbo caches" if A["padded"] != A["head_dim"] else "")
                 + f"; {n_tok} tokens of {Path(corpus).name}")
    notes.append(f"wall time: capture {t1 - t0:.1f} s (tool {cap.seconds:.1f} s), analysis {t2 - t1:.1f} s, total {t2 - t0:.1f} s")
    notes.append("paths: fork = set_rows + backend decode + backend inverse rotation; reference = reference/turbo.quantize "
                 f"with {A['rotation']} and the fork's table; judged against Gaussian rows of the same shape on the same path")
    notes += cap.notes
    swa = info.get("sliding_window")  # from the capture tool (GGUF <arch>.attention.sliding_window; 0 = none)
    if swa and n_tok > swa:
        notes.append(f"the model has {swa}-token sliding-window layers: their attention errors here use full causal "
                     f"attention over {n_tok} tokens (distortion is unaffected); use at most {swa} tokens to match")
    notes += [f"{p}/{t}: not measured: {e}" for (p, t), e in A["errors"].items()]
    notes += loss_notes(A)
    cells.notes += notes
    return cells


# in_verify=False: it runs a model (`turbo-harness check KVREAL`, or verify --checks ...,KVREAL)
CHECK = Check(ID, TITLE, run, order=90, rules="KVREAL", in_verify=False, needs=("model", "corpus", "kv-capture tool"))
