"""Renderers of a :class:`~harness.report.diff.Diff`: diff.json (machines), diff.md (people), diff.html (people,
verdict colours), junit.xml (CI). Every output opens with the answer, then the two sides (fork build, rules,
sizes) and the notes on what makes them not like for like, then every change."""
from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.report.diff import Diff
from harness.report.facts import fmt_num
from harness.report.render import _md_escape


def _cell_text(c) -> str:
    return "-" if c is None else f"{c.verdict.value} {fmt_num(c.value)}"


def side_rows(d: Diff) -> list[tuple[str, str, str]]:
    """(label, BASE text, NEW text) rows: the fork build and how each run was made."""
    from harness.report.diff import side
    a, b = side(d.base, d.base_dir), side(d.new, d.new_dir)

    def fork(s):
        dirty = {True: " (dirty)", False: "", None: ""}.get(s["fork_dirty"], "")
        return f"{str(s['fork_commit'] or 'unknown')[:12]}{dirty} {s['fork_describe'] or ''}".strip()

    def rules(s):
        if not s["rules"]:
            return "not recorded"
        import hashlib
        return "sha256 " + hashlib.sha256(json.dumps(s["rules"], sort_keys=True, default=str).encode()).hexdigest()[:12]

    def plain(v):
        from harness.report.facts import plain as p
        return p(v)
    return [("folder", a["dir"], b["dir"]), ("run", a["run_id"], b["run_id"]), ("verdict", a["verdict"], b["verdict"]),
            ("fork build", fork(a), fork(b)), ("build folder", plain(a["build_dir"]), plain(b["build_dir"])),
            ("target backend", plain(a["target_backend"]), plain(b["target_backend"])),
            ("backends run", plain(a["backends_run"]), plain(b["backends_run"])), ("types", plain(a["types"]), plain(b["types"])),
            ("rules", rules(a), rules(b)), ("sizes", plain(a["sizes"]), plain(b["sizes"])),
            ("started", plain(a["started"]), plain(b["started"]))]


def markdown(d: Diff) -> str:
    """diff.md: the answer, the two sides, the notes, then one row per change (worse first)."""
    lines = [f"# turbo-harness diff: `{d.base.run_id}` -> `{d.new.run_id}`", "", f"**{_md_escape(d.verdict_line())}**", ""]
    lines += [f"- **{_md_escape(n)}**" for n in d.notes] + ([""] if d.notes else [])
    lines += ["| | BASE | NEW |", "|---|---|---|"]
    lines += [f"| {k} | {_md_escape(a)} | {_md_escape(b)} |" for k, a, b in side_rows(d)]
    lines += ["", "## Changes", ""]
    if not d.changes:
        lines.append("None: every cell of BASE is in NEW with the same verdict and a value within its noise.")
    else:
        lines += ["| change | check | type | path | metric | BASE | NEW | noise | why |", "|---|---|---|---|---|---|---|---|---|"]
        for c in d.changes:
            noise = f"{fmt_num(c.noise)} ({c.noise_from})" if c.noise is not None else "-"
            lines.append(f"| **{c.label}** | {c.check} | {c.type} | `{_md_escape(c.path)}` | {c.metric} | {_cell_text(c.base)} | "
                         f"{_cell_text(c.new)} | {noise} | {_md_escape(c.why)} |")
    lines += ["", f"{d.unchanged} matched cells are unchanged (same verdict, value within its noise: 2 combined se where the "
                  f"cells carry one, else 5% of the rule's limit; checks/diff.toml).", "",
              "Exit code with --fail-on worse: 1 when anything is WORSE, a NEW FINDING or DISAPPEARED; --fail-on changed: "
              "1 on any change or when the runs used other rules or sizes; 2 bad input.", ""]
    return "\n".join(lines)


_KIND_COLORS = {"WORSE": "#c62828", "NEW FINDING": "#c62828", "DISAPPEARED": "#6a1b9a", "APPEARED": "#1565c0",
                "BETTER": "#2e7d32", "MOVED": "#ef6c00", "RULE CHANGED": "#8d6e00"}


def html_page(d: Diff) -> str:
    """diff.html: standalone page (CSS inline), changes coloured by kind and cells by verdict."""
    from harness.report.html import _CSS, _badge
    badge = "<span class=v style='background:{}'>{}</span>"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>turbo-harness diff {html.escape(d.base.run_id)} -> "
             f"{html.escape(d.new.run_id)}</title><style>{_CSS}</style></head><body>",
             f"<h1>turbo-harness diff {html.escape(d.base.run_id)} &rarr; {html.escape(d.new.run_id)}</h1>",
             f"<p class=verdict>{html.escape(d.verdict_line())}</p>"]
    parts += [f"<p class=note><b>{html.escape(n)}</b></p>" for n in d.notes]
    parts.append("<table class=meta><tr><th></th><th class=l>BASE</th><th class=l>NEW</th></tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for k, a, b in side_rows(d))
        + "</table><h2>Changes</h2>")
    if not d.changes:
        parts.append("<p>None: every cell of BASE is in NEW with the same verdict and a value within its noise.</p>")
    else:
        parts.append("<table><tr>" + "".join(f"<th class=l>{h}</th>" for h in (
            "change", "check", "type", "path", "metric", "BASE", "NEW", "noise", "why")) + "</tr>")
        for c in d.changes:
            cells = [badge.format(_KIND_COLORS.get(c.label, "#555"), html.escape(c.label)), html.escape(c.check),
                     html.escape(c.type), html.escape(c.path), html.escape(c.metric)]
            for x in (c.base, c.new):
                cells.append("-" if x is None else f"{_badge(x.verdict.value)} {html.escape(fmt_num(x.value))}")
            cells.append(html.escape(f"{fmt_num(c.noise)} ({c.noise_from})") if c.noise is not None else "-")
            cells.append(html.escape(c.why))
            parts.append("<tr>" + "".join(f"<td class=l>{x}</td>" for x in cells) + "</tr>")
        parts.append("</table>")
    parts.append(f"<p class=small>{d.unchanged} matched cells unchanged within their noise (checks/diff.toml).</p></body></html>")
    return "\n".join(parts)


def junit(d: Diff) -> ET.Element:
    """JUnit XML: suite 'diff', one testcase per change; worse / new finding / disappeared are failures, the rest
    pass with a system-out line; a note that the runs are not like for like is one failing case 'comparability'."""
    suites = ET.Element("testsuites", name=f"turbo-harness diff {d.base.run_id} -> {d.new.run_id}")
    s = ET.SubElement(suites, "testsuite", name="diff")
    for c in d.changes:
        tc = ET.SubElement(s, "testcase", classname=f"diff.{c.check}.{c.type}", name=f"{c.path} {c.metric}")
        if c.bad:
            ET.SubElement(tc, "failure", message=f"{c.label}: {c.why}")
        else:
            ET.SubElement(tc, "system-out").text = f"{c.label}: {c.why}"
    tc = ET.SubElement(s, "testcase", classname="diff", name="comparability")
    if not d.comparable:
        ET.SubElement(tc, "failure", message="; ".join(d.notes))
    elif d.notes:
        ET.SubElement(tc, "system-out").text = "\n".join(d.notes)
    cases = [t for t in s if t.tag == "testcase"]
    s.set("tests", str(len(cases)))
    s.set("failures", str(sum(1 for t in cases for ch in t if ch.tag == "failure")))
    s.set("errors", "0")
    s.set("skipped", "0")
    return suites


# (file name, writer(diff) -> text): interchangeable like render.RENDERERS.
DIFF_RENDERERS = (
    ("diff.json", lambda d: json.dumps(d.to_dict(), indent=1, default=str)),
    ("diff.md", markdown),
    ("diff.html", html_page),
    ("junit.xml", lambda d: ET.tostring(junit(d), encoding="unicode", xml_declaration=True)),
)


def write_diff(d: Diff, out_dir: Path) -> list[Path]:
    """Write every format of :data:`DIFF_RENDERERS` into ``out_dir`` (created); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, render in DIFF_RENDERERS:
        p = out_dir / name
        p.write_text(render(d))
        paths.append(p)
    return paths
