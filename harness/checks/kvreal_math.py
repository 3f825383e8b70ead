"""KVREAL's lower floor: padding, vector statistics, attention in float32/float64, quantise round trips (fork and
reference) and BLAS threading. Pure functions of arrays (and of the probe for ``fork_roundtrip``/``fork_rotation``);
the check itself (harness/checks/kvreal.py) builds on them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.checks.common import Context
from harness.checks.observations import decode_route, op_matrices
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.wht import signed_wht_matrix

CLASSIC = ("q4_0", "q8_0")
SIDES = ("K", "V")
PATHS_TURBO = ("fork", "ref", "lloyd", "norot")
PATHS_CLASSIC = ("fork", "ref")
G = T.GROUP



# ----------------------------------------------------------------------------- pure helpers

def padded_width(d: int) -> int:
    """Head width as stored in a turbo cache: the next multiple of 128 (64 -> 128, 256 -> 256)."""
    return ((d + G - 1) // G) * G


def pad_heads(x: np.ndarray) -> np.ndarray:
    """(T, H, D) -> float32 (T, H, Dp) with zeros in the padding (Dp = padded_width(D))."""
    d = x.shape[-1]
    dp = padded_width(d)
    out = np.zeros(x.shape[:-1] + (dp,), np.float32)
    out[..., :d] = x
    return out


def pearson_kurtosis(u: np.ndarray) -> float:
    """E[u^4] / E[u^2]^2 over all entries (3 for a Gaussian; large for spiky/outlier data)."""
    u = np.asarray(u, np.float64).reshape(-1)
    m2 = np.mean(u ** 2)
    return float(np.mean(u ** 4) / m2 ** 2) if m2 > 0 else float("nan")


def vector_stats(x: np.ndarray, R: np.ndarray) -> dict:
    """Statistics of one layer's head vectors that explain how a rotation-based quantiser fares.

    Args:
        x: float (T, H, D) head vectors. R: float64 (128, 128) rotation applied per 128-group.
    Returns:
        {'norm_mean', 'norm_std', 'norm_min', 'norm_max', 'max_abs',
         'chan_scale_max_over_median': max/median over channels of the per-channel RMS,
         'dc_fraction': ||mean vector||^2 / mean ||x||^2 (energy in a shared offset),
         'kurtosis_before': Pearson kurtosis of unit-row coordinates, 'kurtosis_after': the same after
         the rotation (padded rows, every stored coordinate)}.
    """
    rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    nrm = np.linalg.norm(rows, axis=1)
    scale = np.sqrt(np.mean(rows ** 2, axis=0))
    unit = rows / np.where(nrm > 0, nrm, 1.0)[:, None]
    up = pad_heads(unit[:, None, :]).reshape(-1, G).astype(np.float64)
    rot = up @ np.asarray(R, np.float64).T
    mean = rows.mean(axis=0)
    return {"norm_mean": float(nrm.mean()), "norm_std": float(nrm.std()), "norm_min": float(nrm.min()),
            "norm_max": float(nrm.max()), "max_abs": float(np.abs(rows).max()),
            "chan_scale_max_over_median": float(scale.max() / max(np.median(scale), 1e-30)),
            "dc_fraction": float(np.sum(mean ** 2) / max(np.mean(nrm ** 2), 1e-30)),
            "kurtosis_before": pearson_kurtosis(unit), "kurtosis_after": pearson_kurtosis(rot)}


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Causal softmax attention with GQA (reference/attention.attention plus a causal mask; products in float32).

    Args:
        q: (T, Hq, D); k, v: (T, Hkv, D) with Hq a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
    Returns:
        (out float64 (T, Hq, D), logits float64 (Hq, T, T) with -inf above the diagonal).
    """
    L = _logits(q, k, scale)
    return _apply(_softmax(L), v, q.shape[1]), L


# The attention products run in float32 (BLAS sgemm, half the time of float64 on these small CPUs): their
# rounding (~1e-7 relative) is four orders below the smallest error measured here (q8_0, ~1e-3); softmax,
# differences and norms are taken in float64.
_MM = np.float32


def _logits(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """scale * q k^T per query head, float64 (Hq, T, T), -inf above the diagonal (batched BLAS matmul)."""
    rep = q.shape[1] // k.shape[1]
    qh = np.ascontiguousarray(np.asarray(q, _MM).transpose(1, 0, 2))    # (Hq, T, D)
    kh = np.repeat(np.asarray(k, _MM).transpose(1, 2, 0), rep, 0)       # (Hq, D, T)
    L = scale * (qh @ kh).astype(np.float64)
    T_ = L.shape[-1]
    L[:, np.triu(np.ones((T_, T_), bool), 1)] = -np.inf
    return L


def _apply(P: np.ndarray, v: np.ndarray, n_head: int) -> np.ndarray:
    """P (Hq, T, T) times V (T, Hkv, D) per query head -> (T, Hq, D)."""
    rep = n_head // v.shape[1]
    vh = np.repeat(np.asarray(v, _MM).transpose(1, 0, 2), rep, 0)  # (Hq, T, D)
    return (P.astype(_MM) @ vh).astype(np.float64).transpose(1, 0, 2)


def _softmax(L: np.ndarray) -> np.ndarray:
    p = np.exp(L - L.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def attention_errors(q: np.ndarray, k: np.ndarray, v: np.ndarray, kh: np.ndarray | None, vh: np.ndarray | None,
                     scale: float, exact: tuple | None = None) -> dict:
    """Attention error of quantised K (with exact V) or quantised V (with exact K).

    Args:
        q, k, v: (T, H*, D) exact vectors; kh / vh: the quantised-and-decoded K or V (same shape) or None.
        exact: (out, L, P) of the exact attention, when already computed (see :func:`exact_attention`).
    Returns:
        {'attn_rel_err_K', 'logit_rel_err', 'softmax_kl'} when kh is given and {'attn_rel_err_V'} when vh is:
        relative Frobenius error of the attention output; rms(L_hat-L)/rms(L - rowmean L) over causal
        pairs; mean over query rows and heads of KL(p || p_hat) in nats.
    """
    out, L, P = exact or exact_attention(q, k, v, scale)
    ref_n = max(np.linalg.norm(out), 1e-30)
    res = {}
    if kh is not None:
        Lh = _logits(q, kh, scale)
        Ph = _softmax(Lh)
        res["attn_rel_err_K"] = float(np.linalg.norm(_apply(Ph, v, q.shape[1]) - out) / ref_n)
        m = np.isfinite(L)
        Lc = np.where(m, L, 0.0)
        rowmean = Lc.sum(-1, keepdims=True) / m.sum(-1, keepdims=True)
        spread = np.sqrt(np.sum(np.where(m, L - rowmean, 0.0) ** 2) / m.sum())
        with np.errstate(invalid="ignore"):  # -inf - -inf above the diagonal, masked out
            err = np.sqrt(np.sum(np.where(m, Lh - L, 0.0) ** 2) / m.sum())
            kl = np.where(P > 0, P * (np.log(np.where(P > 0, P, 1.0)) - np.log(np.maximum(Ph, 1e-300))), 0.0).sum(-1)
        res["logit_rel_err"] = float(err / max(spread, 1e-30))
        res["softmax_kl"] = float(kl.mean())
    if vh is not None:
        res["attn_rel_err_V"] = float(np.linalg.norm(_apply(P, vh, q.shape[1]) - out) / ref_n)
    return res


def exact_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> tuple:
    """(out (T, Hq, D), logits (Hq, T, T), probabilities (Hq, T, T)) of exact causal attention, float64."""
    L = _logits(q, k, scale)
    P = _softmax(L)
    return _apply(P, v, q.shape[1]), L, P


def nmse(x: np.ndarray, xh: np.ndarray) -> float:
    """sum ||xh - x||^2 / sum ||x||^2 in float64 (padding coordinates are zero in x and, for turbo, in xh)."""
    x = np.asarray(x, np.float64)
    return float(np.sum((np.asarray(xh, np.float64) - x) ** 2) / max(np.sum(x ** 2), 1e-30))


def reference_roundtrip(type_name: str, groups: np.ndarray, R: np.ndarray | None, table: np.ndarray | None) -> np.ndarray:
    """Reference quantise + decode of 128-value groups, back in the original domain.

    Args:
        type_name: turbo type (needs R and table) or 'q4_0' / 'q8_0'.
        groups: float32 (n, 128). R: (128, 128) forward rotation (identity = no rotation). table: sorted centroids.
    Returns:
        float32 (n, 128): turbo: R^T (table[idx] * fp16 corrected norm); classic: ggml's block decode.
    """
    groups = np.ascontiguousarray(groups, np.float32)
    if type_name in CLASSIC:
        return T.decode_any(type_name, T.quantize_classic(type_name, groups), *groups.shape)
    table = np.sort(np.asarray(table, np.float64))
    idx, stored, _ = T.quantize(groups, R, table, 0.5 * (table[1:] + table[:-1]))
    raw = T.pack(type_name, idx, stored)
    dec = T.decode(type_name, raw, table).astype(np.float64)
    return (dec @ np.asarray(R, np.float64)).astype(np.float32)


def fork_roundtrip(ctx: Context, backend: str, type_name: str, groups: np.ndarray) -> np.ndarray:
    """The target's KV write (set_rows) of 128-value groups, decoded by the backend and un-rotated by the
    backend's inverse rotation op (turbo), or decoded by the reference decoders (q4_0/q8_0), as PQ5 does.

    Returns float32 (n, 128) in the original domain.
    """
    groups = np.ascontiguousarray(groups, np.float32)
    raw = ctx.target.quantize(backend, "set_rows", type_name, groups)
    if type_name in CLASSIC:
        return T.decode_any(type_name, raw, *groups.shape)
    dec = ctx.target.decode(backend, decode_route(ctx, backend, type_name), type_name, raw, groups.shape[0], G)
    return ctx.target.wht(backend, dec, 1, G)


def fork_rotation(ctx: Context, backend: str) -> tuple[np.ndarray, str]:
    """The reference's rotation: the signed WHT the backend's op implements, else the harness's own signs."""
    try:
        fac = op_matrices(ctx, backend)["factor"]
        if fac["is_signed_wht"]:
            return signed_wht_matrix(fac["s1"], fac["s2"]), "the fork's rotation op (a signed WHT)"
    except (Unsupported, ProbeCrash, HarnessError):
        pass
    rng = np.random.default_rng(20250417)
    s1, s2 = rng.choice([-1.0, 1.0], G), rng.choice([-1.0, 1.0], G)
    return signed_wht_matrix(s1, s2), "the harness's own signed WHT (the fork's op is absent or not a signed WHT)"


# ----------------------------------------------------------------------------- analysis

_BLAS_FUNCS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
               ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
               ("openblas_get_num_threads", "openblas_set_num_threads"))


def openblas_threads():
    """(get, set) thread-count functions of the OpenBLAS this process has loaded (NumPy's), or None.

    Found through /proc/self/maps (Linux) or NumPy's bundled-library folder; None elsewhere.
    """
    import ctypes
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln.split()[-1]})
    except OSError:
        pass
    paths += [str(p) for p in (Path(np.__file__).resolve().parents[1] / "numpy.libs").glob("*openblas*")]
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for g, st in _BLAS_FUNCS:
            if hasattr(lib, g) and hasattr(lib, st):
                return getattr(lib, g), getattr(lib, st)
    return None


class SingleThreadedBlas:
    """Run BLAS on one thread inside the block (restored after). The products here are small (9 x 256 x 256):
    measured on the 2-core CI machine under load, OpenBLAS's two threads took 143 ms per batched product
    against 1.6 ms on one thread (they spin waiting for a busy core)."""

    def __enter__(self):
        self.fns = openblas_threads()
        if self.fns:
            self.old = self.fns[0]()
            self.fns[1](1)
        return self

    def __exit__(self, *exc):
        if self.fns and self.old > 0:
            self.fns[1](self.old)
        return False
