"""Plots of the PolarQuant checks, drawn from the cells' recorded details (no re-measurement).

codebook.png     PQ2: each quantise path's centroid table vs the Lloyd-Max table, in units of sigma = 1/sqrt(128)
distortion.png   PQ5: NMSE per type and path on Gaussian and outlier rows vs the Lloyd-Max optimum and
                 TurboQuant's bound (arXiv 2504.19874, Thm. 1), q8_0/q4_0 alongside
attention.png    PQ6: relative error of every flash-attention case vs its threshold
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness.report.model import Run  # noqa: E402


def _cells(run: Run, cid: str, metric_prefix: str, needs: tuple[str, ...] = ()):
    """Measured cells of one check whose metric starts with metric_prefix and whose details hold ``needs``."""
    for c in run.checks:
        if c.id == cid:
            return [x for x in c.cells if x.metric.startswith(metric_prefix) and x.value is not None
                    and all(k in x.details for k in needs)]
    return []


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    p = out_dir / f"{name}.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def check_plots(run: Run, out_dir: Path) -> dict[str, Path]:
    """Draw the plots the run's checks support into out_dir; returns {name: path}."""
    out_dir = Path(out_dir)
    made: dict[str, Path] = {}
    cb = _cells(run, "PQ2", "distortion", ("lloyd_max_sigma", "table_sigma"))
    if cb:
        types = sorted({c.type for c in cb})
        fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.6), squeeze=False)
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
        made["codebook"] = _save(fig, out_dir, "codebook")
    d5 = _cells(run, "PQ5", "nmse", ("nmse_gaussian", "nmse_outlier", "lloyd_max_nmse", "upper_bound"))
    if d5:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(d5) + 2), 4))
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
        ax.set_xticks(list(xs), [f"{c.type}\n{c.path}" for c in d5], fontsize=7)
        ax.set_ylabel("NMSE")
        ax.legend(fontsize=7)
        made["distortion"] = _save(fig, out_dir, "distortion")
    d6 = _cells(run, "PQ6", "rel_err")
    if d6:
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(d6) + 2), 4))
        ax.scatter(range(len(d6)), [max(c.value, 1e-12) for c in d6],
                   c=["tab:green" if c.verdict.value == "PASS" else "tab:red" for c in d6], s=14)
        ax.step(range(len(d6)), [c.threshold for c in d6], where="mid", color="k", lw=1, label="threshold")
        ax.set_yscale("log")
        ax.set_xticks(range(len(d6)), [c.path.split("[")[-1].rstrip("]") for c in d6], rotation=90, fontsize=5)
        ax.set_ylabel("relative error vs exact attention")
        ax.legend(fontsize=7)
        made["attention"] = _save(fig, out_dir, "attention")
    return made
