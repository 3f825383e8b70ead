"""A standalone HTML page for a Run: verdict summary, every check's cells, and, when the run holds a
model-level sweep (``run.sections['sweep']``), its table and PNG plots embedded as base64
(PPL and KLD vs bits per real value, prefill/decode speed ratio to q8_0 vs depth).
The PNGs are also written under ``<run_dir>/plots/``.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from harness.report.model import Run

_COLORS = {"PASS": "#2e7d32", "SKIP": "#757575", "PARTIAL": "#ef6c00", "FAIL": "#c62828", "ERROR": "#6a1b9a"}


def _fmt(v, nd=4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}g}"
    return str(v)


def sweep_plots(section: dict, out_dir: Path) -> dict[str, Path]:
    """Draw the sweep plots into ``out_dir`` (PNG, 110 dpi).

    Args:
        section: ``run.sections['sweep']`` (needs 'rows' with bits_per_value/ppl/kld, 'speed' rows).
        out_dir: folder for the PNG files (created).

    Returns:
        {'ppl_kld_vs_bits': path, 'speed_vs_depth': path}; a plot without data is left out.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    rows = [r for r in section.get("rows", []) if r.get("bits_per_value") is not None and r.get("ppl") is not None]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for r in rows:
            bad = r.get("status") == "ERROR"
            for ax, key, se in ((axes[0], "ppl", "ppl_se"), (axes[1], "kld", "kld_se")):
                ax.errorbar(r["bits_per_value"], r[key], yerr=r.get(se) or 0, fmt="x" if bad else "o", capsize=3)
                ax.annotate(r["pair"] + (" (ERROR)" if bad else ""), (r["bits_per_value"], r[key]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = section.get("base") or {}
        if base.get("ppl"):
            axes[0].axhline(base["ppl"], color="grey", ls="--", lw=0.8, label="f16 baseline")
            axes[0].legend(fontsize=7)
        if section.get("noise_floor") is not None:
            axes[1].axhline(max(section["noise_floor"], 1e-6), color="grey", ls="--", lw=0.8, label="f16 noise floor")
            axes[1].legend(fontsize=7)
        axes[0].set(xlabel="bits per real cached value (K,V mean, padding included)", ylabel="PPL (± se)",
                    title="Perplexity vs KV bits")
        axes[1].set(xlabel="bits per real cached value (K,V mean, padding included)", ylabel="mean KLD vs f16 (± se)",
                    title="KL divergence vs KV bits")
        axes[1].set_yscale("symlog", linthresh=1e-3)
        fig.tight_layout()
        p = out_dir / "ppl_kld_vs_bits.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["ppl_kld_vs_bits"] = p
    speed = [s for s in section.get("speed", []) if s.get("ratio") is not None]
    if speed:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
        for ax, test, name in ((axes[0], "pp", "prefill"), (axes[1], "tg", "decode")):
            for pair in dict.fromkeys(s["pair"] for s in speed):
                pts = sorted((s for s in speed if s["pair"] == pair and s["test"] == test), key=lambda s: s["depth"])
                if pts:
                    ax.errorbar([s["depth"] for s in pts], [s["ratio"] for s in pts],
                                yerr=[s["ratio_se"] or 0 for s in pts], marker="o", capsize=3, label=pair)
            ax.axhline(1.0, color="grey", lw=0.8)
            if test == "pp":
                thr = (section.get("rules", {}).get("speed") or {}).get("prefill_ratio_min")
                if thr:
                    ax.axhline(thr, color="red", ls="--", lw=0.8, label=f"rule ≥ {thr}")
            ax.set(xlabel="depth (tokens already in the KV cache)", ylabel=f"{name} tokens/s ÷ q8_0",
                   title=f"{name} speed ratio to q8_0")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / "speed_vs_depth.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["speed_vs_depth"] = p
    return out


_SWEEP_COLS = [("pair", "pair"), ("status", "status"), ("ppl", "PPL"), ("ppl_se", "± se"),
               ("ppl_vs_q8_pct", "PPL vs q8_0 %"), ("d_ln_vs_q8_se", "paired se (ln)"), ("kld", "KLD"),
               ("kld_above_floor", "KLD above floor"), ("same_top_p_pct", "top-1 same %"), ("dp_rms_pct", "RMS Δp %"),
               ("kv_mib", "KV MiB"), ("kv_pred_mib", "predicted MiB"), ("bits_per_value", "bits/real value"),
               ("graph_splits", "splits"), ("error", "error"), ("caveat", "caveat")]


def _sweep_html(section: dict) -> str:
    rows = section.get("rows", [])
    ratio_cols = sorted({c for r in rows for c in r if c.startswith(("pp_ratio_d", "tg_ratio_d"))},
                        key=lambda c: (c[:2], int(c.split("_d")[-1])))
    cols = _SWEEP_COLS[:13] + [(c, c.replace("_ratio_d", " ÷q8 @d")) for c in ratio_cols] + _SWEEP_COLS[13:]
    h = ["<h2>Model-level sweep</h2>"]
    pinned = section.get("pinned") or {}
    h.append("<p class=small>pinned: " + html.escape(", ".join(f"{k}={v}" for k, v in pinned.items())) + "</p>")
    if section.get("base"):
        h.append(f"<p>f16 baseline PPL {_fmt(section['base']['ppl'])} ± {_fmt(section['base']['ppl_se'])}; "
                 f"KLD noise floor (f16 vs f16) {_fmt(section.get('noise_floor'))}</p>")
    for n in section.get("notes", []):
        h.append(f"<p class=note>{html.escape(n)}</p>")
    h.append("<table><tr>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in cols) + "</tr>")
    for r in rows:
        style = ' style="background:#f3e5f5"' if r.get("status") == "ERROR" else ""
        h.append(f"<tr{style}>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c, _ in cols) + "</tr>")
    h.append("</table>")
    return "\n".join(h)


def write_html(run: Run, run_dir: Path) -> Path:
    """Write ``<run_dir>/report.html`` (standalone: CSS inline, plots as base64 PNG) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    v = run.verdict.value
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>turbo-harness {html.escape(run.run_id)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 5px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
             ".v{color:#fff;padding:1px 6px;border-radius:3px}.small{font-size:11px;color:#555}.note{color:#8d6e00}</style>",
             "</head><body>",
             f"<h1>turbo-harness run {html.escape(run.run_id)} <span class=v style='background:{_COLORS[v]}'>{v}</span></h1>"]
    if run.interrupted:
        i = run.interrupted
        parts.append(f"<p><b>INTERRUPTED</b> by {html.escape(str(i.get('signal')))} (exit code {i.get('exit_code')}): "
                     f"partial report; not run: {html.escape(', '.join(i.get('not_run') or []) or 'none')}</p>")
    meta = {k: run.meta[k] for k in list(run.meta)[:40]}
    parts.append("<details><summary>run metadata</summary><table>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td style='text-align:left'>{html.escape(str(val))[:400]}</td></tr>"
        for k, val in meta.items()) + "</table></details>")
    sweep = run.sections.get("sweep")
    if sweep:
        parts.append(_sweep_html(sweep))
        for name, p in sweep_plots(sweep, run_dir / "plots").items():
            b64 = base64.b64encode(p.read_bytes()).decode()
            parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{b64}'><figcaption class=small>"
                         f"plots/{p.name}</figcaption></figure>")
    from harness.report.plots import check_plots
    for name, p in check_plots(run, run_dir / "plots").items():
        b64 = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{b64}'><figcaption class=small>"
                     f"plots/{p.name}</figcaption></figure>")
    for c in run.checks:
        cv = c.verdict.value
        parts.append(f"<h2>{html.escape(c.id)}: {html.escape(c.title)} <span class=v style='background:{_COLORS[cv]}'>{cv}</span></h2>")
        if c.error:
            parts.append(f"<p><b>error:</b> {html.escape(c.error)}</p>")
        for n in c.notes:
            parts.append(f"<p class=note>{html.escape(n)}</p>")
        parts.append("<table><tr><th>type</th><th>path</th><th>metric</th><th>value</th><th>op</th><th>threshold</th>"
                     "<th>margin</th><th>verdict</th><th>caveat</th><th>evidence</th></tr>")
        for cell in c.cells:
            ev = " ".join(f"<a href='{html.escape(e)}'>{html.escape(Path(e).name)}</a>" for e in cell.evidence)
            parts.append(
                f"<tr><td>{html.escape(cell.type)}</td><td>{html.escape(cell.path)}</td><td>{html.escape(cell.metric)}</td>"
                f"<td>{_fmt(cell.value)}</td><td>{html.escape(cell.op)}</td><td>{_fmt(cell.threshold)}</td>"
                f"<td>{_fmt(cell.margin)}</td><td><span class=v style='background:{_COLORS[cell.verdict.value]}'>"
                f"{cell.verdict.value}</span></td><td style='text-align:left'>{html.escape(cell.caveat)}</td><td>{ev}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out
