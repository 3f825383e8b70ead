"""Reading the log-probability files that ``llama-perplexity --kl-divergence-base FILE`` writes, and the KL divergence
of one saved run against another.

Why: in a cross-backend sweep (:mod:`harness.runners.xbackend`) the reference backend runs each K/V pair once and
saves that run's logits, so that the other backends' runs of the pair can be scored against them by the fork's
``llama-perplexity --kl-divergence``. The same pass cannot also be scored against the reference's own f16 logits
(llama-perplexity either saves or scores), so that pair's KLD vs its own f16 is computed here from the two saved
files: the f16 baseline's and the pair's. The statistics follow the fork's ``kl_divergence()``; tests cross-check
them against llama-perplexity's own numbers on the same data (tests/test_logit_files.py).

File layout (the fork's tools/perplexity/perplexity.cpp, ``perplexity()`` and ``process_logits(std::ostream&...)``;
little-endian, as written by the machine that ran it)::

    char[8]  "_logits_"
    uint32   n_ctx                     tokens per chunk
    int32    n_vocab
    int32    n_chunk
    int32    tokens[n_chunk * n_ctx]   the evaluated tokens (before the BOS substitution)
    then per chunk, per scored position j = 0 .. n_ctx - 2 - n_ctx/2 (the second half of the chunk), one row of
    nv = 2*((n_vocab + 1)/2) + 4 uint16:
        float32 scale, float32 min_log_prob   (the first 4 uint16)
        uint16  q[n_vocab]                     log p_i = scale * q[i] + min_log_prob; q = 0 for log-its below max - 16
        (one uint16 of padding when n_vocab is odd)

Row j of chunk c predicts token ``tokens[c*n_ctx + n_ctx/2 + j + 1]``.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

MAGIC = b"_logits_"
LOG_P_MIN = -16.0  # the fork sums the KLD only over the base's entries with log p > -16 (kl_divergence: p_log_base > -16.f)


@dataclass
class LogitsFile:
    """A saved log-probability file, opened.

    Attributes:
        path: the file. n_ctx, n_vocab, n_chunk: its header. tokens: int32 [n_chunk * n_ctx].
        rows: uint16 memmap [n_chunk * (n_ctx - 1 - n_ctx//2), nv] (the rows as written, header floats included).
    """

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray
    rows: np.ndarray

    @property
    def per_chunk(self) -> int:
        """Scored positions per chunk: n_ctx - 1 - n_ctx//2 (the fork's ``n_ctx - 1 - first``)."""
        return self.n_ctx - 1 - self.n_ctx // 2

    def targets(self) -> np.ndarray:
        """int64 [n_rows]: the token each row predicts (``tokens[c*n_ctx + n_ctx/2 + j + 1]``)."""
        first = self.n_ctx // 2
        t = self.tokens.reshape(self.n_chunk, self.n_ctx)[:, first + 1:]
        return t.reshape(-1).astype(np.int64)


def open_logits(path: str | Path) -> LogitsFile:
    """Open a ``--kl-divergence-base`` file (memory-mapped; nothing large is read yet).

    Raises:
        HarnessError: not such a file (magic), a header that makes no sense, or a size that does not match the
            header (a truncated file: the run died while writing it).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise HarnessError(f"cannot read the logits file {path}: {e}") from e
    if len(head) < 20 or head[:8] != MAGIC:
        raise HarnessError(f"{path} is not a llama-perplexity logits file (no '_logits_' header)")
    n_ctx = int(np.frombuffer(head, "<u4", 1, 8)[0])
    n_vocab, n_chunk = (int(x) for x in np.frombuffer(head, "<i4", 2, 12))
    if n_ctx < 4 or n_vocab < 2 or n_chunk < 1:
        raise HarnessError(f"{path}: header n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk} makes no sense")
    nv = 2 * ((n_vocab + 1) // 2) + 4
    off = 20 + 4 * n_chunk * n_ctx
    n_rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    want = off + 2 * n_rows * nv
    if size != want:
        raise HarnessError(f"{path}: {size} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}) "
                           f"needs {want}: the file is truncated or not from this layout")
    tokens = np.fromfile(path, "<i4", n_chunk * n_ctx, offset=20)
    rows = np.memmap(path, "<u2", "r", offset=off, shape=(n_rows, nv))
    return LogitsFile(path, n_ctx, n_vocab, n_chunk, tokens, rows)


_P_MIN = np.float32(math.exp(LOG_P_MIN))  # log p > -16  <=>  p > e^-16 (exp is monotone)


def _block(base: LogitsFile, other: LogitsFile, tgt: np.ndarray, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Per-row figures of rows lo..hi: kld (float64), nll_base, nll (float64, nats), same_top (bool).

    With log p = sp q_p + mp and log q = sq q_q + mq (each row's scale and minimum), in nine passes over the block:
    d = log p - log q = sp q_p - sq q_q + (mp - mq); p = exp(sp q_p + mp), zeroed where p <= e^-16; KLD = p . d."""
    rp, rq = base.rows[lo:hi], other.rows[lo:hi]
    hp, hq = np.ascontiguousarray(rp[:, :4]).view("<f4"), np.ascontiguousarray(rq[:, :4]).view("<f4")  # [n, 2]
    up, uq = rp[:, 4:4 + base.n_vocab], rq[:, 4:4 + other.n_vocab]
    lp = np.multiply(up, hp[:, :1], dtype=np.float32)          # sp q_p
    d = np.multiply(uq, -hq[:, :1], dtype=np.float32)          # -sq q_q
    d += lp
    d += hp[:, 1:2] - hq[:, 1:2]                               # log p - log q
    lp += hp[:, 1:2]                                           # log p
    np.exp(lp, out=lp)                                         # p
    np.multiply(lp, lp > _P_MIN, out=lp)                       # the fork sums only where log p > -16
    kld = np.matmul(lp[:, None, :], d[:, :, None])[:, 0, 0].astype(np.float64)
    idx = np.arange(hi - lo)
    t = tgt[lo:hi]
    nll_base = -(hp[:, 0].astype(np.float64) * up[idx, t] + hp[:, 1])
    nll = -(hq[:, 0].astype(np.float64) * uq[idx, t] + hq[:, 1])
    same = up.argmax(axis=1) == uq.argmax(axis=1)  # first maximum on both sides, as the fork's loop takes it
    return {"kld": kld, "nll_base": nll_base, "nll": nll, "same": same}


def _mean_unc(s: float, s2: float, n: int) -> tuple[float, float]:
    """The fork's ``mean_and_uncertainty``: (sum/n, sqrt((s2/n - mean^2)/(n-1)) when positive and n > 10, else 0)."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def kld_between_files(base_path: str | Path, other_path: str | Path, workers: int | None = None,
                      block_elems: int = 1 << 22) -> dict:
    """The KL divergence of one saved run (``other``) from another (``base``), token by token, as llama-perplexity's
    ``--kl-divergence`` prints it, but with both sides read from saved (uint16-compressed) files.

    Formulas (tools/perplexity/perplexity.cpp, ``log_softmax(... kl_divergence_result&)`` and ``kl_divergence()``):
    per scored token, KLD = sum over the vocabulary entries with log p_base > -16 of p_base (log p_base - log q); the
    top-1 agreement counts tokens whose argmax is the same; Δp = q(target) - p_base(target); the mean and its
    uncertainty are the fork's ``mean_and_uncertainty`` (population variance / (n - 1)); percentiles interpolate
    linearly over the sorted values; the ln(PPL) ratio's uncertainty is that of the per-token difference of negative
    log-likelihoods (the fork's sqrt(se_q^2 + se_base^2 - 2 cov)).
    The fork's own run uses the exact logits of the scored side; here both sides carry the files' rounding (a step of
    (max - min)/65535 <= 16/65535 nats per entry) and the clamp of entries below max - 16.

    Args:
        base_path, other_path: two ``--kl-divergence-base`` files of the same tokens (n_ctx, n_vocab, n_chunk, tokens).
        workers: threads (numpy releases the GIL in its loops); default os.cpu_count().
        block_elems: uint16 values per block (memory: about 16 bytes per value per worker).
    Returns:
        {'count' (scored tokens), 'chunks', 'kld', 'kld_se', 'kld_max', 'kld_p99_9', 'kld_p99', 'kld_p95',
        'kld_median' (nats/token), 'same_top_p_pct', 'same_top_p_pct_se' (percent), 'dp_mean_pct', 'dp_mean_pct_se',
        'dp_rms_pct', 'dp_max_pct', 'dp_min_pct', 'dp_median_pct' (percent), 'ln_ppl_ratio_files',
        'ln_ppl_ratio_se' (nats: mean and uncertainty of nll_other - nll_base from the files)}; floats.
    Raises:
        HarnessError: a file that cannot be read (see :func:`open_logits`) or files of different tokens or shapes.
    """
    a, b = open_logits(base_path), open_logits(other_path)
    for what in ("n_ctx", "n_vocab", "n_chunk"):
        if getattr(a, what) != getattr(b, what):
            raise HarnessError(f"logits files differ in {what} ({getattr(a, what)} vs {getattr(b, what)}): "
                               f"{a.path} and {b.path} are not runs of the same tokens")
    if not np.array_equal(a.tokens, b.tokens):
        raise HarnessError(f"logits files {a.path} and {b.path} hold different tokens (another corpus, model or ctx)")
    tgt = a.targets()
    n = a.rows.shape[0]
    step = max(1, block_elems // a.rows.shape[1])
    spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as ex:
        parts = list(ex.map(lambda s: _block(a, b, tgt, *s), spans))
    kld = np.concatenate([p["kld"] for p in parts])
    nll_b = np.concatenate([p["nll_base"] for p in parts])
    nll_o = np.concatenate([p["nll"] for p in parts])
    same = np.concatenate([p["same"] for p in parts])
    dp = (np.exp(-nll_o.astype(np.float32)) - np.exp(-nll_b.astype(np.float32))).astype(np.float64)
    out = {"count": float(n), "chunks": float(a.n_chunk)}
    out["kld"], out["kld_se"] = _mean_unc(kld.sum(), (kld * kld).sum(), n)
    ks = np.sort(kld.astype(np.float32))
    out.update(kld_max=float(ks[-1]), kld_p99_9=float(np.percentile(ks, 99.9)), kld_p99=float(np.percentile(ks, 99.0)),
               kld_p95=float(np.percentile(ks, 95.0)), kld_median=float(np.median(ks)))
    top = float(same.sum()) / n
    out["same_top_p_pct"] = 100.0 * top
    out["same_top_p_pct_se"] = 100.0 * math.sqrt(top * (1.0 - top) / (n - 1)) if n > 1 else 0.0
    m, u = _mean_unc(dp.sum(), (dp * dp).sum(), n)
    out["dp_mean_pct"], out["dp_mean_pct_se"] = 100.0 * m, 100.0 * u
    ms, _ = _mean_unc((dp * dp).sum(), (dp ** 4).sum(), n)
    out["dp_rms_pct"] = 100.0 * math.sqrt(ms)
    out.update(dp_max_pct=100.0 * float(dp.max()), dp_min_pct=100.0 * float(dp.min()),
               dp_median_pct=100.0 * float(np.median(dp)))
    d = nll_o - nll_b
    out["ln_ppl_ratio_files"], out["ln_ppl_ratio_se"] = _mean_unc(d.sum(), (d * d).sum(), n)
    return out
