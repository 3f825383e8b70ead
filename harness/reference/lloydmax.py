"""Lloyd-Max scalar codebooks for one coordinate of a rotated unit vector.

Source: S. Lloyd, "Least squares quantization in PCM" (1957/1982) and J. Max, "Quantizing for
minimum distortion" (1960): alternate (a) decision thresholds at the midpoints of neighbouring
centroids and (b) each centroid at the conditional mean of its cell, until both stop moving.

The distribution: one coordinate of a uniformly random unit vector in R^d has density
proportional to (1 - x^2)^((d-3)/2) on [-1, 1], i.e. X = 2U - 1 with U ~ Beta((d-1)/2, (d-1)/2);
its high-d limit is N(0, 1/d). (TurboQuant, arXiv 2504.19874, Lemma 1 and Sec. 3.1.)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special  # scipy.stats and scipy.integrate cost ~1 s to import; the laws below need only these


@dataclass(frozen=True)
class Codebook:
    """A scalar quantiser: sorted centroids (k,) and the k-1 decision thresholds between them."""

    centroids: np.ndarray
    thresholds: np.ndarray
    distortion: float  # expected squared error per coordinate under the design distribution


class _Gaussian:
    """N(0, sigma^2): cdf Phi(x / sigma) (``scipy.special.ndtr``), partial moments in closed form."""

    def __init__(self, sigma: float):
        self.s = sigma
        self.lo, self.hi = -np.inf, np.inf

    def pdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.exp(-0.5 * (x / self.s) ** 2) / (self.s * np.sqrt(2 * np.pi))

    def mass(self, a, b):
        return special.ndtr(np.asarray(b) / self.s) - special.ndtr(np.asarray(a) / self.s)

    def first_moment(self, a, b):
        # ∫_a^b x φ_σ(x) dx = σ² (φ_σ(a) - φ_σ(b))
        return self.s ** 2 * (self.pdf(a) - self.pdf(b))

    def second_moment(self, a, b):
        # ∫_a^b x² φ_σ(x) dx = σ² (mass(a, b) + a φ_σ(a) - b φ_σ(b))   (integration by parts; x φ_σ(x) -> 0 at ±inf)
        def xpdf(x):
            x = np.atleast_1d(np.asarray(x, dtype=np.float64))
            out = np.zeros_like(x)
            f = np.isfinite(x)
            out[f] = x[f] * self.pdf(x[f])
            return out
        return self.s ** 2 * (self.mass(a, b) + xpdf(a) - xpdf(b))


class _Beta:
    """Density f(x) = C (1 - x^2)^(alpha-1) on [-1, 1], X = 2U - 1 with U ~ Beta(alpha, alpha): cdf by the regularised
    incomplete beta function (``scipy.special.betainc``), partial moments in closed form."""

    def __init__(self, d: int | None = None, alpha: float | None = None):
        self.alpha = (d - 1) / 2.0 if alpha is None else float(alpha)
        # normaliser of f(x) = C (1 - x^2)^(alpha - 1) on [-1, 1]
        self.C = 1.0 / (2.0 ** (2 * self.alpha - 1) * special.beta(self.alpha, self.alpha))
        self.lo, self.hi = -1.0, 1.0

    def pdf(self, x):
        x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
        return self.C * (1 - x ** 2) ** (self.alpha - 1)

    def mass(self, a, b):
        def cdf(x):
            return special.betainc(self.alpha, self.alpha, (np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0) + 1) / 2)
        return cdf(b) - cdf(a)

    def first_moment(self, a, b):
        # ∫ x (1-x²)^(α-1) dx = -(1-x²)^α / (2α)
        a = np.clip(a, -1.0, 1.0)
        b = np.clip(b, -1.0, 1.0)
        return self.C * ((1 - a ** 2) ** self.alpha - (1 - b ** 2) ** self.alpha) / (2 * self.alpha)

    def second_moment(self, a, b):
        # x² = 1 - (1 - x²): ∫_a^b x² f = mass_α(a, b) - C_α ∫_a^b (1-x²)^α dx = mass_α - (C_α / C_{α+1}) mass_{α+1}
        up = _Beta(alpha=self.alpha + 1)
        return self.mass(a, b) - self.C / up.C * up.mass(a, b)


def _distribution(kind: str, d: int):
    if kind == "gaussian":
        return _Gaussian(1.0 / np.sqrt(d))
    if kind == "beta":
        return _Beta(d)
    if kind == "std_normal":
        return _Gaussian(1.0)
    raise ValueError(f"unknown distribution {kind!r}: use 'beta', 'gaussian' or 'std_normal'")


def expected_distortion(centroids: np.ndarray, thresholds: np.ndarray, kind: str = "beta", d: int = 128) -> float:
    """Expected squared error E[(X - Q(X))^2] of a scalar quantiser under the design distribution.

    Per cell [a, b) with centroid c: ∫_a^b (x - c)² f(x) dx = M2 - 2c M1 + c² M0, the cell's partial moments in closed
    form (Gaussian: by parts; Beta: (1 - x²)^α through the incomplete beta function of α + 1). Checked against
    numerical quadrature (``scipy.integrate.quad``) in tests/test_reference.py.

    Args:
        centroids: float array (k,), sorted ascending.
        thresholds: float array (k-1,), sorted ascending; cell i is [thresholds[i-1], thresholds[i]).
        kind: 'beta' (exact coordinate law for dimension d), 'gaussian' (N(0, 1/d)) or 'std_normal'.
        d: the vector dimension (the rotation group size, 128 in the fork).

    Returns:
        Mean squared error per coordinate (same units as X², i.e. a fraction of ||x||²/d... per coordinate).

    Raises:
        ValueError: shapes inconsistent or unknown distribution.
    """
    c = np.asarray(centroids, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (c.shape[0] - 1,):
        raise ValueError(f"need k-1 thresholds for k centroids, got {t.shape} for {c.shape}")
    dist = _distribution(kind, d)
    edges = np.concatenate([[dist.lo], t, [dist.hi]])
    a, b = np.maximum(edges[:-1], dist.lo), np.minimum(edges[1:], dist.hi)
    keep = b > a
    a, b, c = a[keep], b[keep], c[keep]
    cells = dist.second_moment(a, b) - 2 * c * dist.first_moment(a, b) + c ** 2 * dist.mass(a, b)
    return float(np.sum(np.maximum(cells, 0.0)))


@lru_cache(maxsize=32)
def lloyd_max(bits: int, kind: str = "beta", d: int = 128, tol: float = 1e-12, max_iter: int = 200000) -> Codebook:
    """Solve the Lloyd-Max codebook with 2**bits levels.

    Args:
        bits: 1..6.
        kind: 'beta' (coordinate of a random unit vector in R^d), 'gaussian' (N(0, 1/d)) or
            'std_normal' (N(0, 1); the textbook tables of Max 1960).
        d: dimension for 'beta' and 'gaussian'.
        tol: stop when no centroid moves more than tol (in units of the distribution's sigma).

    Returns:
        :class:`Codebook` with float64 centroids (2**bits,), thresholds (2**bits - 1,) and the
        expected squared error per coordinate.

    Raises:
        ValueError: bits out of range or unknown distribution; RuntimeError if not converged.
    """
    if not 1 <= bits <= 6:
        raise ValueError(f"bits must be in 1..6, got {bits}")
    dist = _distribution(kind, d)
    k = 2 ** bits
    sigma = 1.0 if kind == "std_normal" else 1.0 / np.sqrt(d)
    # start at equal-probability quantiles of the Gaussian approximation
    c = special.ndtri((np.arange(k) + 0.5) / k) * sigma
    for _ in range(max_iter):
        t = 0.5 * (c[1:] + c[:-1])
        edges = np.concatenate([[dist.lo], t, [dist.hi]])
        m = dist.mass(edges[:-1], edges[1:])
        new = dist.first_moment(edges[:-1], edges[1:]) / m
        moved = np.max(np.abs(new - c)) / sigma
        c = new
        if moved < tol:
            break
    else:
        raise RuntimeError(f"Lloyd-Max did not converge for bits={bits}, kind={kind}")
    t = 0.5 * (c[1:] + c[:-1])
    return Codebook(centroids=c, thresholds=t, distortion=expected_distortion(c, t, kind, d))


def turboquant_upper_bound(bits: int) -> float:
    """TurboQuant's proven MSE upper bound for unit vectors, ``(sqrt(3)·pi/2) · 4^-b``.

    Source: arXiv 2504.19874, Theorem 1 (MSE-optimal TurboQuant). Returned as a normalised MSE
    (E||x - x_hat||² for ||x|| = 1).
    """
    return float(np.sqrt(3.0) * np.pi / 2.0 * 4.0 ** (-bits))
