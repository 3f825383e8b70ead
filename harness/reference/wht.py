"""Signed Walsh-Hadamard transform (WHT), written from the papers.

TurboQuant (arXiv 2504.19874, Sec. 3) needs a random rotation R that makes every coordinate of a
rotated unit vector follow the same known distribution; the randomised Hadamard transform
R = D2 · H_n · D1 / sqrt(n) (Ailon & Chazelle's fast Johnson-Lindenstrauss transform; also the
rotation used by QuaRot and PolarQuant, arXiv 2502.02617 Sec. 4) is such a rotation at O(n log n).
H_n is the Sylvester-ordered Hadamard matrix (the one ``scipy.linalg.hadamard`` returns), D1 and D2 diagonal ±1.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def hadamard(n: int) -> np.ndarray:
    """Sylvester-ordered Hadamard matrix H_n, read-only float64 (n, n): H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]]
    (Sylvester 1867; the construction and order of ``scipy.linalg.hadamard``, which tests/test_reference.py compares
    it with). Built here because importing scipy.linalg for it cost a third of a second of every command's start.

    Raises:
        ValueError: n not a power of two.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    H.setflags(write=False)
    return H


def signed_wht_matrix(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Dense signed WHT ``R = diag(s2) @ H @ diag(s1) / sqrt(n)``.

    Args:
        s1, s2: float or int arrays of shape (n,), entries ±1; n a power of two.

    Returns:
        float64 array (n, n); ``R @ x`` is the forward transform of a column vector x.

    Raises:
        ValueError: n not a power of two, shapes differ, or entries not ±1.
    """
    s1 = np.asarray(s1, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    n = s1.shape[0]
    if s2.shape != (n,) or n < 1 or n & (n - 1):
        raise ValueError(f"sign vectors must both have the same power-of-two length, got {s1.shape}, {s2.shape}")
    if not (np.all(np.abs(s1) == 1) and np.all(np.abs(s2) == 1)):
        raise ValueError("sign vectors must contain only +1 and -1")
    return (s2[:, None] * hadamard(n) * s1[None, :]) / np.sqrt(n)


def wht_forward(x: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Forward signed WHT of each row: ``y = R x`` with R from :func:`signed_wht_matrix`.

    Args:
        x: array (..., n), any float dtype; computed in float64.
    Returns:
        float64 array of x's shape.
    """
    R = signed_wht_matrix(s1, s2)
    return np.asarray(x, dtype=np.float64) @ R.T


def wht_inverse(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Inverse signed WHT of each row: ``x = R^T y`` (R is orthogonal, so R^-1 = R^T).

    Args:
        y: array (..., n); computed in float64.
    Returns:
        float64 array of y's shape.
    """
    R = signed_wht_matrix(s1, s2)
    return np.asarray(y, dtype=np.float64) @ R


def factor_signed_wht(R: np.ndarray) -> dict:
    """Try to factor a measured rotation as ``D2 · H · D1 / sqrt(n)``.

    The sign pattern of R divided elementwise by H's must be the rank-one matrix ``s2 s1^T``.
    The pair (s1, s2) is only defined up to a common sign flip; it is returned canonicalised so
    that ``s1[0] == +1``.

    Args:
        R: float array (n, n), the measured forward transform (``R @ e_j`` is column j).

    Returns:
        dict with ``s1``, ``s2`` (int8 arrays (n,)), ``magnitude_err`` (max ||R_ij| - 1/sqrt(n)|),
        ``sign_factor_mismatches`` (entries whose sign disagrees with the rank-one fit) and
        ``is_signed_wht`` (bool: no mismatch and magnitude_err < 1e-3).
    """
    R = np.asarray(R, dtype=np.float64)
    n = R.shape[0]
    H = hadamard(n)
    mag_err = float(np.max(np.abs(np.abs(R) - 1.0 / np.sqrt(n))))
    S = np.sign(R) * H  # should equal s2 s1^T
    S[S == 0] = 1
    s1 = S[0, :] * S[0, 0]  # choose s1[0] = +1
    s2 = S[:, 0] * s1[0]
    fit = np.outer(s2, s1)
    mism = int(np.count_nonzero(fit != S))
    return {
        "s1": s1.astype(np.int8),
        "s2": s2.astype(np.int8),
        "magnitude_err": mag_err,
        "sign_factor_mismatches": mism,
        "is_signed_wht": bool(mism == 0 and mag_err < 1e-3),
    }


def canonical_signs(s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical form of a sign pair, flipping both when ``s1[0] == -1`` (R is unchanged).

    Args:
        s1, s2: arrays (n,) of ±1.
    Returns:
        (s1, s2) as int8 arrays with ``s1[0] == +1``.
    """
    s1 = np.asarray(s1).astype(np.int8)
    s2 = np.asarray(s2).astype(np.int8)
    if s1[0] < 0:
        return -s1, -s2
    return s1, s2
