"""Exact scaled-dot-product attention in float64 (Vaswani et al. 2017, Eq. 1), with GQA.

Layouts follow ggml_flash_attn_ext: q (n_head, n_q, D), k (n_head_kv, n_kv, D), v (n_head_kv, n_kv, Dv);
query head h reads K/V head h // (n_head / n_head_kv) (grouped-query attention, Ainslie et al. 2023).
"""
from __future__ import annotations

import numpy as np


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """softmax(scale · q k^T) v per head, no mask.

    Args:
        q: float (n_head, n_q, D); k: float (n_head_kv, n_kv, D); v: float (n_head_kv, n_kv, Dv).
        scale: logit scale, usually 1/sqrt(D).
    Returns:
        float64 (n_q, n_head, Dv) - ggml's output layout (ne = {Dv, n_head, n_q}).
    Raises:
        ValueError: n_head not a multiple of n_head_kv.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    nh, nkv = q.shape[0], k.shape[0]
    if nh % nkv:
        raise ValueError(f"n_head {nh} is not a multiple of n_head_kv {nkv}")
    rep = nh // nkv
    kk = np.repeat(k, rep, axis=0)
    vv = np.repeat(v, rep, axis=0)
    s = scale * np.einsum("hqd,hkd->hqk", q, kk)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,hkd->hqd", p, vv)
    return out.transpose(1, 0, 2)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Frobenius relative error ||out - ref|| / ||ref|| (float64)."""
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
