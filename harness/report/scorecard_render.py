"""Renderers of a :class:`~harness.report.scorecard.Scorecard`: scorecard.json, scorecard.md and scorecard.html
(verdict colours). One row per fork build; every cell holds a verdict and value or the reason nothing was measured."""
from __future__ import annotations

import html
import json
from pathlib import Path

from harness.report.render import _md_escape
from harness.report.scorecard import TYPES, Scorecard

_COLORS = {"PASS": "#c8e6c9", "SKIP": "#eeeeee", "PARTIAL": "#ffe0b2", "FAIL": "#ffcdd2", "ERROR": "#e1bee7",
           "NOT MEASURED": "#f5f5f5", "INTERRUPTED": "#e1bee7"}


def markdown(sc: Scorecard) -> str:
    """scorecard.md: one table, a row per fork build, then the root finding per fork in full."""
    head = ["fork (repository @ commit (branch))", "verdict", "root finding (fix first)", "backends executed"]
    head += [f"layout {t}" for t in TYPES] + [f"{c} {t}" for c, t in sc.columns]
    lines = ["# turbo-harness scorecard", "",
             f"{len(sc.rows)} fork builds; per check x type the verdict and its key value (the cell nearest or farthest "
             f"beyond its limit), or why nothing was measured. Layout: values per block / bytes per block, bits per "
             f"value; whether a 2-byte rnorm field follows the fp16 norm.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sc.rows:
        vals = [r.fork, f"**{r.verdict}**", r.root, r.backends] + [r.layouts[t] for t in TYPES]
        vals += [f"**{s.verdict}** {s.text}" for s in (r.scores[k] for k in sc.columns)]
        lines.append("| " + " | ".join(_md_escape(v) for v in vals) + " |")
    lines += ["", "## Root finding per fork (what a maintainer should fix first)", ""]
    lines += [f"- **{_md_escape(r.fork)}** ({r.verdict}; report `{r.run_dir}`): {_md_escape(r.root)}" for r in sc.rows]
    lines += ["", "Root finding: the first FAIL or PARTIAL in the order layout (PQ4), rotation (PQ1), norms (PQ3), codebook (PQ2), "
                  "distortion (PQ5), attention (PQ6), path agreement (COMPAT), model results (an upstream finding causes the "
                  "downstream ones); an ERROR (the harness could not measure) only when the fork has no finding.", ""]
    return "\n".join(lines)


def html_page(sc: Scorecard) -> str:
    """scorecard.html: standalone page, cells coloured by verdict, the reason or value in each."""
    from harness.report.html import _CSS, _badge
    css = _CSS + "td.s{white-space:normal;min-width:11em;max-width:22em;text-align:left}td.f{white-space:normal;min-width:16em}"
    p = [f"<!doctype html><html><head><meta charset='utf-8'><title>turbo-harness scorecard</title><style>{css}</style>"
         f"</head><body><h1>turbo-harness scorecard</h1>",
         f"<p>{len(sc.rows)} fork builds. Per check x type: the verdict and its key value, or why nothing was measured. "
         f"Layout: values / bytes per block, bits per value, whether a 2-byte rnorm field follows the norm.</p>",
         "<div style='overflow-x:auto'><table><tr><th class=l>fork</th><th>verdict</th><th class=l>root finding (fix first)</th>"
         "<th>backends executed</th>" + "".join(f"<th>layout {t}</th>" for t in TYPES)
         + "".join(f"<th>{html.escape(c)}<br>{t}</th>" for c, t in sc.columns) + "</tr>"]
    for r in sc.rows:
        cells = [f"<td class=f><b>{html.escape(r.fork)}</b><br><span class=small>{html.escape(r.repository)}<br>"
                 f"{html.escape(r.commit)}<br>{html.escape(r.run_dir)}</span></td>",
                 f"<td>{_badge(r.verdict)}</td>", f"<td class=s>{html.escape(r.root)}</td>", f"<td class=s>{html.escape(r.backends)}</td>"]
        cells += [f"<td class=s>{html.escape(r.layouts[t])}</td>" for t in TYPES]
        for k in sc.columns:
            s = r.scores[k]
            cells.append(f"<td class=s style='background:{_COLORS.get(s.verdict, '#fff')}'><b>{html.escape(s.verdict)}</b> "
                         f"{html.escape(s.text)}</td>")
        p.append("<tr>" + "".join(cells) + "</tr>")
    p.append("</table></div><h2>Root finding per fork</h2><ul class=findings>")
    p += [f"<li>{_badge(r.verdict)} <b>{html.escape(r.fork)}</b>: {html.escape(r.root)}</li>" for r in sc.rows]
    p.append("</ul></body></html>")
    return "\n".join(p)


# (file name, writer(scorecard) -> text), interchangeable like render.RENDERERS.
SCORECARD_RENDERERS = (
    ("scorecard.json", lambda sc: json.dumps(sc.to_dict(), indent=1, default=str)),
    ("scorecard.md", markdown),
    ("scorecard.html", html_page),
)


def write_scorecard(sc: Scorecard, out_dir: Path) -> list[Path]:
    """Write every format of :data:`SCORECARD_RENDERERS` into ``out_dir`` (created); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, render in SCORECARD_RENDERERS:
        f = out_dir / name
        f.write_text(render(sc))
        out.append(f)
    return out
