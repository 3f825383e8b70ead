"""Plots of the PolarQuant checks, drawn from the cells' recorded details (no re-measurement).

codebook.png     PQ2: each quantise path's centroid table vs the Lloyd-Max table, in units of sigma = 1/sqrt(128)
distortion.png   PQ5: NMSE per type and path on Gaussian and outlier rows vs the Lloyd-Max optimum and
                 TurboQuant's bound (arXiv 2504.19874, Thm. 1), q8_0/q4_0 alongside
attention.png    PQ6: relative error of every flash-attention case vs its threshold
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from harness.report.model import Run

SOURCE_SHA = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]  # a changed drawing code redraws


def _subplots(*args, figsize, **kw):
    """(figure, axes) drawn without pyplot (a bare matplotlib Figure renders PNG through Agg): pyplot's import and
    backend set-up cost about a second, and matplotlib is imported only when a plot is actually drawn."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kw)


def _fingerprint(cells) -> str:
    """SHA-256 of everything a plot shows (each cell's type, path, metric, value, threshold, verdict, details)."""
    data = [(c.type, c.path, c.metric, c.value, c.threshold, c.verdict.value, c.details) for c in cells]
    text = json.dumps(data, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return hashlib.sha256((SOURCE_SHA + text).encode()).hexdigest()


def _fresh(out_dir: Path, name: str, key: str) -> Path | None:
    """The plot already drawn from the same data (its key beside it), else None. The report is rewritten after
    every check; without this every rewrite drew every plot again (issue 23: most of verify's non-check time)."""
    p, k = out_dir / f"{name}.png", out_dir / f".{name}.key"
    return p if p.is_file() and k.is_file() and k.read_text() == key else None


def _cells(run: Run, cid: str, metric_prefix: str, needs: tuple[str, ...] = ()):
    """Measured cells of one check whose metric starts with metric_prefix and whose details hold ``needs``."""
    for c in run.checks:
        if c.id == cid:
            return [x for x in c.cells if x.metric.startswith(metric_prefix) and x.value is not None
                    and all(k in x.details for k in needs)]
    return []


def _save(fig, out_dir: Path, name: str, key: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    p = out_dir / f"{name}.png"
    fig.savefig(p, dpi=100)
    (out_dir / f".{name}.key").write_text(key)
    return p


def _draw_codebook(cb, out_dir: Path, key: str) -> Path:
    """codebook.png: each quantise path's centroid table beside the Lloyd-Max table, one panel per type."""
    types = sorted({c.type for c in cb})
    fig, axes = _subplots(1, len(types), figsize=(4.2 * len(types), 3.6), squeeze=False)
    for ax, t in zip(axes[0], types):
        first = next(c for c in cb if c.type == t)
        lm = first.details["lloyd_max_sigma"]
        ax.plot(range(len(lm)), lm, "k--", marker="x", label="Lloyd-Max (Beta, d=128)")
        for c in (c for c in cb if c.type == t):
            ax.plot(range(len(c.details["table_sigma"])), c.details["table_sigma"], marker="o", ms=3, lw=1,
                    label=f"{c.path} ({c.value:.2f}x D*)")
        ax.set_title(f"{t} centroids")
        ax.set_xlabel("index")
        ax.set_ylabel("centroid / sigma")
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "codebook", key)


def _draw_distortion(d5, out_dir: Path, key: str) -> Path:
    """distortion.png: NMSE per type and path, Lloyd-Max optimum and TurboQuant's bound beside."""
    fig, ax = _subplots(figsize=(max(6, 0.9 * len(d5) + 2) + 2.6, 4.2))
    xs = range(len(d5))
    ax.bar([x - 0.2 for x in xs], [c.details["nmse_gaussian"] for c in d5], 0.4, label="Gaussian rows")
    ax.bar([x + 0.2 for x in xs], [c.details["nmse_outlier"] for c in d5], 0.4, label="one channel 40x")
    ax.scatter(xs, [c.details["lloyd_max_nmse"] for c in d5], marker="_", s=400, c="k", label="Lloyd-Max optimum", zorder=3)
    ax.scatter(xs, [c.details["upper_bound"] for c in d5], marker="_", s=400, c="r", label="TurboQuant bound", zorder=3)
    for name, col in (("q8_0_gaussian_nmse", "g"), ("q4_0_gaussian_nmse", "m")):
        v = d5[0].details.get(name)
        if isinstance(v, float):
            ax.axhline(v, color=col, ls=":", lw=1, label=name.replace("_gaussian_nmse", " (same rows)"))
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"{c.type}\n{c.path}" for c in d5], fontsize=8)
    for tick, c in zip(ax.get_xticklabels(), d5):
        tick.set_color("#c62828" if c.verdict.value == "FAIL" else ("#ef6c00" if c.verdict.value == "PARTIAL" else "k"))
    ax.set_ylabel("NMSE (log)")
    ax.set_title("PQ5 distortion per type and quantise path (tick colour: verdict)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, never over a bar
    return _save(fig, out_dir, "distortion", key)


def _draw_attention(d6, out_dir: Path, key: str) -> Path:
    """attention.png: relative error of every flash-attention case against its threshold."""
    # one row per case, labels horizontal and readable; the threshold as a short bar on each row
    ys = list(range(len(d6)))
    fig, ax = _subplots(figsize=(9, max(3.0, 0.19 * len(d6) + 1.2)))
    colors = {"PASS": "tab:green", "PARTIAL": "tab:orange"}
    ax.scatter([max(c.value, 1e-12) for c in d6], ys, c=[colors.get(c.verdict.value, "tab:red") for c in d6], s=16,
               zorder=3, label="relative error")
    ax.scatter([c.threshold for c in d6], ys, marker="|", s=90, c="k", label="threshold")
    ax.set_xscale("log")
    ax.set_yticks(ys, [c.path.replace(":flash_attn[", ": ").rstrip("]") for c in d6], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("relative error vs exact attention (log)")
    ax.set_title("PQ6 flash attention per case (green PASS, orange PARTIAL, red FAIL)", fontsize=9)
    ax.grid(axis="x", lw=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, out_dir, "attention", key)


PLOTS = (  # name, check, metric prefix, details needed, drawing function
    ("codebook", "PQ2", "distortion", ("lloyd_max_sigma", "table_sigma"), _draw_codebook),
    ("distortion", "PQ5", "nmse", ("nmse_gaussian", "nmse_outlier", "lloyd_max_nmse", "upper_bound"), _draw_distortion),
    ("attention", "PQ6", "rel_err", (), _draw_attention),
)

_background = False  # set by in_background(): plots are drawn in a worker thread while the checks go on
_pool = None
_pending: dict = {}  # plot path -> (data key, Future)


@contextmanager
def in_background():
    """Within this block :func:`check_plots` hands a changed plot to a worker thread and returns the plots that are
    ready; the next call outside it waits for them. ``verify`` writes its report after every check: the plot of a
    check is then drawn while the next check measures (the probe's calls leave the interpreter free)."""
    global _background
    prev, _background = _background, True
    try:
        yield
    finally:
        _background = prev


def _draw(path: Path, key: str, draw) -> Path | None:
    """The plot at ``path`` for data ``key``: drawn now, or handed to the worker thread (None until it is done)."""
    global _pool
    pend = _pending.get(path)
    if pend is not None:
        if pend[0] == key and _background and not pend[1].done():
            return None
        _pending.pop(path)
        pend[1].result()  # an exception of the drawing is raised here, as a drawing done in place would
        if pend[0] == key:
            return path
    if not _background:
        return draw()
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")
    _pending[path] = (key, _pool.submit(draw))
    return None


def check_plots(run: Run, out_dir: Path) -> dict[str, Path]:
    """Draw the plots the run's checks support into out_dir (a plot whose data did not change since it was drawn
    there is kept, not drawn again; within :func:`in_background` a changed one is drawn in a worker thread and left
    out until it is ready); returns {name: path}."""
    out_dir = Path(out_dir)
    made: dict[str, Path] = {}
    for name, cid, prefix, needs, draw in PLOTS:
        cells = _cells(run, cid, prefix, needs)
        if not cells:
            continue
        key = _fingerprint(cells)
        path = out_dir / f"{name}.png"
        got = path if path not in _pending and _fresh(out_dir, name, key) else \
            _draw(path, key, lambda draw=draw, cells=cells, key=key: draw(cells, out_dir, key))
        if got is not None:
            made[name] = got
    return made
