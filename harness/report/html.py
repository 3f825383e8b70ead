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

from harness.report.model import Run, Table

_COLORS = {"PASS": "#2e7d32", "SKIP": "#757575", "PARTIAL": "#ef6c00", "FAIL": "#c62828", "ERROR": "#6a1b9a"}


def _fmt(v, nd=4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v + 0.0:.{nd}g}"  # + 0.0 turns -0.0 into 0
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
    markers = "osD^vP*Xph<>"
    if rows:
        # pairs at the same bits overlap: each pair has its own colour and marker, named in one legend
        # below the plots (never over a point) instead of text labels that run into each other
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
        for i, r in enumerate(rows):
            bad = r.get("status") == "ERROR"
            for ax, key, se in ((axes[0], "ppl", "ppl_se"), (axes[1], "kld", "kld_se")):
                ax.errorbar(r["bits_per_value"], r[key], yerr=r.get(se) or 0, fmt=markers[i % len(markers)], capsize=3,
                            color=f"C{i % 10}", mfc="none" if bad else None, ms=6,
                            label=(r["pair"] + (" (ERROR)" if bad else "")) if ax is axes[0] else None)
        base = section.get("base") or {}
        if base.get("ppl"):
            axes[0].axhline(base["ppl"], color="grey", ls="--", lw=0.8, label="f16 baseline PPL")
        if section.get("noise_floor") is not None:
            axes[1].axhline(max(section["noise_floor"], 1e-6), color="grey", ls=":", lw=0.8)
            axes[1].annotate("f16 noise floor", (axes[1].get_xlim()[0], max(section["noise_floor"], 1e-6)),
                             textcoords="offset points", xytext=(2, 3), fontsize=7, color="grey")
        axes[0].set(xlabel="bits per real cached value (K,V mean, padding included)", ylabel="PPL (± se)",
                    title="Perplexity vs KV bits")
        axes[1].set(xlabel="bits per real cached value (K,V mean, padding included)", ylabel="mean KLD vs f16 (± se)",
                    title="KL divergence vs KV bits")
        axes[1].set_yscale("symlog", linthresh=1e-3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(labels) - 1) // 6), 1, 1))
        p = out_dir / "ppl_kld_vs_bits.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["ppl_kld_vs_bits"] = p
    speed = [s for s in section.get("speed", []) if s.get("ratio") is not None]
    if speed:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=False)
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
        by_label = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                by_label.setdefault(lab, h)
        fig.legend(list(by_label.values()), list(by_label), loc="lower center", ncol=min(6, len(by_label)), fontsize=8,
                   frameon=False)  # below the plots: a legend inside an axis covered the lines' first points
        fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(by_label) - 1) // 6), 1, 1))
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
    cols = [c for c in cols if c[0] == "pair" or any(r.get(c[0]) not in (None, "") for r in rows)]  # no empty columns
    h = ["<h2>Model-level sweep</h2>"]
    pinned = section.get("pinned") or {}
    from harness.report.facts import plain
    from harness.runners.llama_logs import kld_shown
    h.append("<p class=small>pinned: " + html.escape("; ".join(f"{k} {plain(v)}" for k, v in pinned.items())) + "</p>")
    if section.get("base"):
        h.append(f"<p>f16 baseline PPL {_fmt(section['base']['ppl'])} ± {_fmt(section['base']['ppl_se'])}; "
                 f"KLD noise floor (f16 vs f16) {_fmt(kld_shown(section.get('noise_floor')))}</p>")
    for n in section.get("notes", []):
        h.append(f"<p class=note>{html.escape(n)}</p>")
    h.append("<div style='overflow-x:auto'><table class=sweep><tr>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
             + "</tr>")
    for r in rows:
        style = ' style="background:#f3e5f5"' if r.get("status") == "ERROR" else ""
        h.append(f"<tr{style}>" + "".join(f"<td{' class=l' if c in ('error', 'caveat') else ''}>"
                                          f"{html.escape(_fmt(kld_shown(r.get(c)) if c == 'kld' else r.get(c)))}</td>"
                                          for c, _ in cols) + "</tr>")
    h.append("</table></div>")
    return "\n".join(h)


_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 5px;text-align:right;vertical-align:top;white-space:nowrap}"
        "th{background:#eee;white-space:normal}td.l{white-space:normal}table.sweep td.l{min-width:16em}"
        "td:first-child{text-align:left}td.l,th.l{text-align:left}.v{color:#fff;padding:1px 6px;border-radius:3px}"
        ".small{font-size:11px;color:#555}.note{color:#8d6e00}ul.findings{padding-left:1.2em}"
        "ul.findings li{margin:.35em 0;line-height:1.35}.meta td{text-align:left;word-break:break-word;white-space:normal;max-width:1100px}"
        "p.verdict{font-size:1.15em;font-weight:bold}img{max-width:100%}")
_LABEL_COLORS = {**_COLORS, "XFAIL": "#1565c0", "GROWN": "#c62828", "XPASS": "#c62828"}


def _badge(label: str) -> str:
    """A verdict badge coloured by the label's first word ('PASS (known-findings gate; ...)' is green)."""
    color = _LABEL_COLORS.get(label) or _LABEL_COLORS.get(label.split(" ")[0], "#555")
    return f"<span class=v style='background:{color}'>{html.escape(label)}</span>"


def _md_table_html(md: str) -> str:
    """A section's Markdown (headings, pipe tables, paragraphs) as HTML, escaped."""
    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in rows]
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'} class=l>{html.escape(c.strip('`'))}</{'th' if i == 0 else 'td'}>"
                                 for c in r) + "</tr>" for i, r in enumerate(cells)) + "</table>")
            table.clear()
    for ln in md.splitlines():
        if ln.startswith("|"):
            table.append(ln)
            continue
        flush()
        if ln.startswith("## "):
            out.append(f"<h2>{html.escape(ln[3:])}</h2>")
        elif ln.startswith("![") and "](" in ln and ln.endswith(")"):  # a plot written beside the page
            alt, src = ln[2:-1].split("](", 1)
            out.append(f"<figure><img alt='{html.escape(alt)}' src='{html.escape(src)}'></figure>")
        elif ln.strip():
            out.append(f"<p class=small>{html.escape(ln.replace('**', '').replace('`', ''))}</p>")
    flush()
    return "\n".join(out)


def _figure(alt: str, image: Path | None, caption: str) -> str:
    """A plot as an HTML figure: the PNG embedded as base64 when ``image`` is a file, else linked by ``caption``
    (its run-folder-relative path); alt text and caption escaped."""
    src = (f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"
           if image is not None and image.is_file() else html.escape(caption))
    return (f"<figure><img alt='{html.escape(alt)}' src='{src}'><figcaption class=small>{html.escape(caption)}"
            f"</figcaption></figure>")


def table_html(table: Table, run_dir: Path | None = None) -> str:
    """A check's :class:`Table` as HTML: heading, caption, the rows (numbers via ``fmt_num``, None as '-'), its
    plot (embedded as base64 when the file is in ``run_dir``, else linked) and evidence links; all text escaped."""
    from harness.report.facts import fmt_num
    h = [f"<h3>{html.escape(table.title)}</h3>"]
    h += [f"<p class=small>{html.escape(c.replace('`', ''))}</p>" for c in table.caption]
    if table.rows:
        h.append("<div style='overflow-x:auto'><table class=data><tr>"
                 + "".join(f"<th class=l>{html.escape(str(c))}</th>" for c in table.columns) + "</tr>")
        h += ["<tr>" + "".join(f"<td class=l>{html.escape(fmt_num(v))}</td>" for v in r) + "</tr>" for r in table.rows]
        h.append("</table></div>")
    if table.image:
        h.append(_figure(table.title, Path(run_dir) / table.image if run_dir is not None else None, table.image))
    if table.evidence:
        h.append("<p class=small>evidence: " + " ".join(f"<a href='{html.escape(e)}'>{html.escape(Path(e).name)}</a>"
                                                       for e in table.evidence) + "</p>")
    return "\n".join(h)


def write_html(run: Run, run_dir: Path) -> Path:
    """Write ``<run_dir>/report.html`` (standalone: CSS inline, plots as base64 PNG) and return its path.

    The page opens with the verdict and one plain line per finding (as summary.md), then an overview
    table of the checks, what was measured with what, and then the details.
    """
    from harness.report.findings import findings, gate_summary, headline, verdict_line
    from harness.report.facts import plain, run_facts, sweep_setup_line
    from harness.report.render import _detail_table, known_markdown

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    v = gate_summary(run)  # the verdict, or with a known-findings gate the gate's result and the findings it saw
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>turbo-harness {html.escape(run.run_id)}: {html.escape(v)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>turbo-harness run {html.escape(run.run_id)} {_badge(v)}</h1>",
             f"<p class=verdict>{html.escape(verdict_line(run))}</p>"]
    if run.interrupted:
        i = run.interrupted
        from harness.unfinished import cause, is_running
        code = "" if is_running(i) else f" (exit code {i.get('exit_code')})"
        parts.append(f"<p><b>{run.headline}</b> {html.escape(cause(i))}{code}: "
                     f"partial report; not run: {html.escape(', '.join(i.get('not_run') or []) or 'none')}"
                     + (f"; shown from the earlier run in this folder, not this one: "
                        f"{html.escape(', '.join(f'{k} ({v})' for k, v in run.earlier().items()))}" if run.earlier() else "")
                     + "</p>")
    items = [("ROOT", ln[4:].strip()) for ln in headline(run) if ln.startswith("ROOT ")]  # root causes first
    items += [(f.label, f.line()[len(f.label):].strip()) for f in findings(run)]
    items += [("XPASS", ln[5:].strip()) for ln in headline(run) if ln.startswith("XPASS")]
    if items:
        parts.append("<ul class=findings>" + "".join(f"<li>{_badge(lab)} {html.escape(text)}</li>" for lab, text in items)
                     + "</ul>")
    setup = sweep_setup_line(run)
    if setup:
        parts.append(f"<p>{html.escape(setup)}</p>")
    km = known_markdown(run)
    if km:
        parts.append(_md_table_html("\n".join(km)))
    parts.append("<h2>Overview</h2><table class=overview><tr><th class=l>check</th><th>verdict</th><th>pass</th>"
                 "<th>partial</th><th>fail</th><th>skip</th><th>error</th><th>time s</th></tr>")
    for c in run.checks:
        n = {x: sum(1 for y in c.cells if y.verdict.value == x) for x in ("PASS", "PARTIAL", "FAIL", "SKIP", "ERROR")}
        parts.append(f"<tr><td><a href='#{html.escape(c.id)}'>{html.escape(c.id)}</a> {html.escape(c.title)}</td>"
                     f"<td>{_badge(run.verdict_label(c))}</td>" + "".join(f"<td>{n[x]}</td>" for x in n)
                     + f"<td>{c.duration_s:.1f}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Run</h2><table class=meta>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(val.replace('`', ''))}</td></tr>" for k, val in run_facts(run))
        + "</table>")
    parts.append("<details><summary>all run metadata</summary><table class=meta>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(plain(val))}</td></tr>" for k, val in run.meta.items())
        + "</table></details>")
    sweep = run.sections.get("sweep")
    if sweep:
        parts.append(_sweep_html(sweep))
        parts += [_figure(name, p, f"plots/{p.name}") for name, p in sweep_plots(sweep, run_dir / "plots").items()]
    from harness.report.plots import check_plots
    parts += [_figure(name, p, f"plots/{p.name}") for name, p in check_plots(run, run_dir / "plots").items()]
    for c in run.checks:
        cv = run.verdict_label(c)
        parts.append(f"<h2 id='{html.escape(c.id)}'>{html.escape(c.id)}: {html.escape(c.title)} {_badge(cv)}</h2>")
        if c.error:
            parts.append(f"<p><b>error:</b> {html.escape(c.error)}</p>")
        for n in c.notes:
            parts.append(f"<p class=note>{html.escape(n)}</p>")
        parts += [table_html(t, run_dir) for t in c.tables]
        dt = _detail_table(c)
        if dt:
            parts.append(_md_table_html("\n".join(dt)))
        parts.append("<table><tr><th>type</th><th class=l>path</th><th class=l>metric</th><th>value</th><th>op</th>"
                     "<th>threshold</th><th>margin</th><th>verdict</th><th class=l>caveat</th><th class=l>evidence</th></tr>")
        for cell in c.cells:
            ev = " ".join(f"<a href='{html.escape(e)}'>{html.escape(Path(e).name)}</a>" for e in cell.evidence)
            kn = f" {_badge(cell.known['status'].upper())}" if cell.known else ""
            parts.append(
                f"<tr><td>{html.escape(cell.type)}</td><td class=l>{html.escape(cell.path)}"
                f"{'' if cell.target else ' (non-target)'}</td><td class=l>{html.escape(cell.metric)}</td>"
                f"<td>{_fmt(cell.value)}</td><td>{html.escape(cell.op)}</td><td>{_fmt(cell.threshold)}</td>"
                f"<td>{_fmt(cell.margin)}</td><td>{_badge(cell.verdict.value)}{kn}</td>"
                f"<td class=l style='min-width:18em'>{html.escape(cell.caveat)}</td><td class=l>{ev}</td></tr>")
        parts.append("</table>")
    for name, sec in run.sections.items():  # free-form sections of reports written before checks returned tables
        if name not in ("sweep", "known") and isinstance(sec, dict) and sec.get("markdown"):
            parts.append(_md_table_html(sec["markdown"]))
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out
