"""Observations: measurements of the target that several checks use, cached per run context.

The rotation op's matrix, the quantiser's sign vectors, centroid tables, decision thresholds, and the decode
route that reads a backend's bytes. Every one is a function of the target only, never of the fork's source;
each is measured once per :class:`harness.checks.common.Context` (``ctx.cached``). This module sits one floor
above :mod:`harness.checks.common` (it uses the context; common imports nothing from here).
"""
from __future__ import annotations

import numpy as np

from harness.checks.common import Context
from harness.errors import HarnessError, ProbeCrash, RemoteLost, Unsupported
from harness.reference import turbo as T
from harness.reference.wht import factor_signed_wht, signed_wht_matrix

# route -> relative error bound of its output. fa_decode passes values through a flash-attention kernel
# (f16 V, f16 softmax arithmetic on GPUs): measured on an H200 CUDA build at up to 5.95e-4 relative
# (reports/samples/cuda-h200, PQ4 evidence); 1e-3 bounds it while any packing or table error is O(1).
# dequant_t4 (metal-src) reads a half-precision copy of the table: a correctly rounded fp16 copy is within 2^-11
# relative of the float table (4.9e-4 bounds it); a copy rounded more coarsely is beyond it.
LOSSY_DECODE = {"fa_decode": 1e-3, "dequant_t4": 4.9e-4}


def decode_tolerance(route: str, ref: np.ndarray) -> np.ndarray:
    """Absolute tolerance for comparing a route's decoded values with exact ones: 0 for exact routes,
    the route's relative error bound (LOSSY_DECODE) times |ref| for routes through half-precision kernels."""
    rel = LOSSY_DECODE.get(route, 0.0)
    return rel * np.abs(np.asarray(ref, np.float64)) + (1e-12 if rel else 0.0)


def precise_table(ctx: Context, type_name: str, fallback_backend: str) -> np.ndarray:
    """The centroid table read through an exact decode route (the CPU type traits when present), for
    midpoints and reference decodes; the given backend's lossy table when no exact route exists."""
    for b in ctx.target.backends():
        try:
            r = decode_route(ctx, b.name, type_name)
        except Unsupported:
            continue
        if r not in LOSSY_DECODE:
            return centroid_table(ctx, b.name, r, type_name)
    return centroid_table(ctx, fallback_backend, decode_route(ctx, fallback_backend, type_name), type_name)


def decode_route(ctx: Context, backend: str, type_name: str = "turbo3") -> str:
    """The first decode route of a backend that works for this type (cached). Raises Unsupported."""
    def pick():
        raw = T.pack(type_name, np.zeros((1, 128), np.uint8), np.ones(1))  # UnknownLayout: nothing to try
        errs, crashes, lost = [], [], []
        for r in ctx.target.routes(backend).decode:
            try:
                ctx.target.decode(backend, r, type_name, raw.reshape(-1), 1, 128)
                return r
            except RemoteLost as e:  # a remote server died or is gone: try the next route (a server the harness
                lost.append(e)       # started is back for it); if none works, ERROR (nothing measured), not SKIP
                errs.append(f"{r}: {e}")
            except ProbeCrash as e:
                crashes.append(e)
                errs.append(f"{r}: {e}")
            except (Unsupported, HarnessError) as e:
                errs.append(f"{r}: {e}")
        if crashes:  # a route the backend accepted crashed and none worked: the fork's fault, not a SKIP
            raise ProbeCrash(f"no decode route for {type_name} on {backend} works: {'; '.join(errs)}")
        if lost:
            raise RemoteLost(f"no decode route for {type_name} on {backend} could be measured: {'; '.join(errs)}")
        raise Unsupported(f"no decode route for {type_name} on {backend} ({'; '.join(errs)})")
    return ctx.cached(("decode_route", backend, type_name), pick)


def byte_reader(ctx: Context, backend: str, type_name: str) -> tuple[str, str]:
    """(backend, decode route) that reads the bytes a backend writes for a type.

    The backend's own first working decode route (:func:`decode_route`); for a writer-only backend (one that
    quantises a type it cannot decode, as Vulkan writes turbo2/turbo4 but reads only turbo3 on fork 69d8e4be4),
    the first exact decode route of another backend: the bytes are the common block format, so any reader decodes
    them, and the writer is still judged (spec "Every backend, and how it was examined").

    Raises:
        Unsupported: no backend of the target decodes the type exactly (the backend's own reason).
    """
    try:
        return backend, decode_route(ctx, backend, type_name)
    except Unsupported as own:
        for b in ctx.target.backends():
            if b.name == backend:
                continue
            try:
                r = decode_route(ctx, b.name, type_name)
            except Unsupported:
                continue
            if r not in LOSSY_DECODE:
                return b.name, r
        raise own


def op_matrices(ctx: Context, backend: str) -> dict:
    """Forward and inverse matrices of the backend's rotation op, from the 128 basis vectors.

    Returns {'R': float64 (128,128) with R @ e_j = column j, 'Rinv': same for the inverse op,
    'factor': factor_signed_wht(R)}. Raises Unsupported when the op is absent.
    """
    def measure():
        eye = np.eye(128, dtype=np.float32)
        R = ctx.target.wht(backend, eye, 0, 128).astype(np.float64).T
        Rinv = ctx.target.wht(backend, eye, 1, 128).astype(np.float64).T
        return {"R": R, "Rinv": Rinv, "factor": factor_signed_wht(R)}
    return ctx.cached(("op", backend), measure)


def centroid_table(ctx: Context, backend: str, route: str, type_name: str) -> np.ndarray:
    """Centroid table read by decoding one block per index value (all indices = k, norm 1).

    Packing order cannot affect it. Returns float64 (2**bits,) in index order.
    """
    def measure():
        f = T.fmt(type_name)
        idx = np.repeat(np.arange(f.levels, dtype=np.uint8)[:, None], 128, axis=1)
        raw = T.pack(type_name, idx, np.ones(f.levels)).reshape(-1)
        dec = ctx.target.decode(backend, route, type_name, raw, f.levels, 128).astype(np.float64)
        spread = float(np.max(np.abs(dec - dec[:, :1]) / np.maximum(np.abs(dec[:, :1]), 1e-30)))
        return dec[:, 0].copy(), spread
    return ctx.cached(("table", backend, route, type_name), measure)[0]


def centroid_table_spread(ctx: Context, backend: str, route: str, type_name: str) -> float:
    """Largest relative difference between the values of one decoded constant-index block (must be 0:
    every position of a block with one index and one norm decodes to the same centroid)."""
    centroid_table(ctx, backend, route, type_name)
    return ctx.cached(("table", backend, route, type_name), lambda: None)[1]


def quantizer_rotation(ctx: Context, backend: str, route: str, type_name: str) -> dict:
    """Sign pattern of the quantiser's rotation, from quantising the 128 basis vectors.

    Quantising e_j stores the rotated image R e_j = column j of R, whose entries are ±1/sqrt(128);
    the sign of each decoded coordinate gives sign(R_ij) (decoded by :func:`byte_reader`). Returns factor_signed_wht's dict of the
    sign matrix, plus 'R' = the signed WHT it implies (or None when it is not one).
    """
    def measure():
        eye = np.eye(128, dtype=np.float32)
        raw = ctx.target.quantize(backend, route, type_name, eye)
        rb, route_d = byte_reader(ctx, backend, type_name)
        dec = ctx.target.decode(rb, route_d, type_name, raw, 128, 128).astype(np.float64)
        S = np.sign(dec).T / np.sqrt(128)  # column j from row j
        fac = factor_signed_wht(S)
        fac["R"] = signed_wht_matrix(fac["s1"], fac["s2"]) if fac["is_signed_wht"] else None
        return fac
    return ctx.cached(("qrot", backend, route, type_name), measure)


_SPREAD: list = []


def _spread() -> np.ndarray:
    """Gaussian-like spread of 128 coordinates (normal quantiles / sqrt(128), a fixed permutation), computed once."""
    if not _SPREAD:
        from scipy.special import ndtri  # the standard normal quantile function (scipy.stats.norm.ppf)
        g = ndtri((np.arange(128) + 0.5) / 128) / np.sqrt(128)
        _SPREAD.append(np.random.default_rng(7).permutation(g))
    return _SPREAD[0].copy()


def _probe_rows(R: np.ndarray, t: np.ndarray, coord: int, table: np.ndarray, ref_coord: int) -> np.ndarray:
    """Rows x = R^T y with unit y: y[coord] = t, y[ref_coord] = outermost centroid, others at centroids."""
    g = _spread()
    rest = table[np.argmin(np.abs(g[:, None] - table[None, :]), axis=1)]  # each at a centroid: far from thresholds
    rest[ref_coord] = table[-1]
    rest[coord] = 0.0
    rn = np.linalg.norm(rest)
    y = np.repeat(rest[None, :], len(t), axis=0)
    y *= (np.sqrt(1 - t ** 2) / rn)[:, None]
    y[:, coord] = t
    return (y @ R).astype(np.float32)  # R^T y as rows: y @ R


def decision_thresholds(ctx: Context, backend: str, route: str, type_name: str, half_width: float = 2e-3,
                        coord: int = 3, ref_coord: int = 77) -> dict:
    """Measure the quantiser's decision thresholds by sweeping one rotated coordinate across each.

    Inputs are built in the rotated domain with the quantiser's own rotation (quantizer_rotation;
    the op's matrix when the quantiser is not a signed WHT), so the swept coordinate's value is known.
    Two grids of 256 points locate each transition to ~1e-8. The indices are read by :func:`byte_reader` (another
    backend's decoder for a writer-only backend). Returns {'thresholds': float64 (k-1,)
    (NaN where no transition was found within the window), 'midpoints': (k-1,), 'table': (k,),
    'resolution': float64 (k-1,), the width of the last bracket (the true transition lies within
    ±resolution/2 of the value returned; ~6e-8 for a ±2e-3 window; NaN where not found)}.
    """
    def measure():
        table = np.sort(precise_table(ctx, type_name, backend))
        qr = quantizer_rotation(ctx, backend, route, type_name)
        R = qr["R"] if qr["R"] is not None else op_matrices(ctx, backend)["R"]
        rb, rr = byte_reader(ctx, backend, type_name)  # another backend's reader when this one only writes the type
        own_table = np.sort(centroid_table(ctx, rb, rr, type_name))
        mids = 0.5 * (table[1:] + table[:-1])
        gaps = np.diff(table)

        def index_of(ts):
            x = _probe_rows(R, ts, coord, table, ref_coord)
            raw = ctx.target.quantize(backend, route, type_name, x)
            dec = ctx.target.decode(rb, rr, type_name, raw, len(ts), 128)
            dec = dec.astype(np.float64)
            ratio = dec[:, coord] / np.where(dec[:, ref_coord] != 0, dec[:, ref_coord], 1.0)
            return np.argmin(np.abs(ratio[:, None] - (own_table / own_table[-1])[None, :]), axis=1)

        found = np.full(len(mids), np.nan)
        resolution = np.full(len(mids), np.nan)
        for i, m in enumerate(mids):
            w = min(half_width, 0.45 * min(gaps[i], gaps[i - 1] if i > 0 else gaps[i],
                                            gaps[i + 1] if i + 1 < len(gaps) else gaps[i]))
            lo, hi = m - w, m + w
            for stage in range(2):
                ts = np.linspace(lo, hi, 256)
                idx = index_of(ts)
                up = np.nonzero(idx >= i + 1)[0]
                if len(up) == 0 or up[0] == 0:
                    if stage == 1:  # the transition sits at the bracket's edge, within float32 noise
                        found[i] = hi if len(up) == 0 else lo
                        resolution[i] = ts[1] - ts[0]
                    break
                lo, hi = ts[up[0] - 1], ts[up[0]]
            else:
                found[i] = 0.5 * (lo + hi)
                resolution[i] = hi - lo
        return {"thresholds": found, "midpoints": mids, "table": table, "resolution": resolution}
    return ctx.cached(("thr", backend, route, type_name), measure)
