"""Renderers of one :class:`~harness.report.model.Run`: JSON (machines), Markdown (people), JUnit XML (CI)."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.report.model import Run, Verdict


def fmt_num(v) -> str:
    """Compact number formatting for tables ('-' for None)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int,)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3g}" if (abs(v) >= 1e-3 and abs(v) < 1e4) else f"{v:.2e}"
    return str(v)


def write_json(run: Run, run_dir: Path) -> Path:
    """Write run.json (schema turbo-harness/run, versioned) into run_dir; returns its path."""
    p = Path(run_dir) / "run.json"
    p.write_text(json.dumps(run.to_dict(), indent=1, default=str))
    return p


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(run: Run) -> str:
    """The human summary: verdict, metadata, per-check tables, sections, what was not run."""
    m = run.meta
    lines = [f"# turbo-harness run `{run.run_id}`: **{run.headline}**", ""]
    if run.interrupted:
        lines += interrupted_lines(run.interrupted, "checks") + [""]
    facts = [
        ("fork", f"{m.get('fork_commit', '?')}{' (dirty' + (', diff sha256 ' + m['fork_diff_sha256'][:12] if m.get('fork_diff_sha256') else '') + ')' if m.get('fork_dirty') else ''} "
                 f"{m.get('fork_describe', '')}" if m.get("fork_commit") else None),
        ("provenance", m.get("provenance_note")),
        ("layouts the reference does not know", "; ".join(m.get("layout_notes") or []) or None),
        ("fork dir", m.get("fork_dir")),
        ("target backend", m.get("target_backend")),
        ("backends run", ", ".join(m.get("backends_run", [])) or "-"),
        ("backends not available here", ", ".join(m.get("backends_not_available", [])) or "-"),
        ("build", f"{m.get('build_dir', '-')}; {' '.join(m.get('cmake_options', []))}"),
        ("compiler", m.get("cxx_compiler")),
        ("GPU / driver", m.get("gpu") or "none"),
        ("harness", f"{m.get('harness_version')} - `{m.get('command_line', '')}`"),
        ("started", m.get("started")),
    ]
    for k, v in facts:
        if v:
            lines.append(f"- **{k}**: {_md_escape(v)}")
    lines += ["", "## Verdicts", "", "| check | verdict | cells (pass/partial/fail/skip/error) | time s |", "|---|---|---|---|"]
    for c in run.checks:
        counts = [sum(1 for x in c.cells if x.verdict == v) for v in
                  (Verdict.PASS, Verdict.PARTIAL, Verdict.FAIL, Verdict.SKIP, Verdict.ERROR)]
        lines.append(f"| {c.id} {_md_escape(c.title)} | **{c.verdict.value}** | {'/'.join(map(str, counts))} | {c.duration_s:.1f} |")
    for c in run.checks:
        lines += ["", f"## {c.id} {c.title}: {c.verdict.value}", ""]
        if c.error:
            lines.append(f"ERROR: {_md_escape(c.error)}")
        for n in c.notes:
            lines.append(f"- {_md_escape(n)}")
        if not c.cells:
            continue
        lines += ["", "| type | path | metric | value | threshold | margin | verdict | note | evidence |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in c.cells:
            tgt = "" if x.target else " (non-target)"
            ev = " ".join(f"[{Path(e).name}]({e})" for e in x.evidence) or ("run.json" if x.details else "-")
            lines.append(f"| {x.type} | `{x.path}`{tgt} | {x.metric} | {fmt_num(x.value)} | {x.op} {fmt_num(x.threshold)} | "
                         f"{fmt_num(x.margin)} | {x.verdict.value} | {_md_escape(x.caveat)} | {ev} |")
    for name, sec in run.sections.items():
        if isinstance(sec, dict) and sec.get("markdown"):
            lines += ["", sec["markdown"]]
    lines += ["", "Exit code rule: 0 no FAIL/ERROR, 1 a FAIL (or PARTIAL with --strict), 2 an ERROR or bad usage, "
                  "130 / 143 interrupted (SIGINT / SIGTERM).", ""]
    return "\n".join(lines)


def interrupted_lines(info: dict, what: str = "checks") -> list[str]:
    """Markdown lines that mark a partial report: the signal, the exit code and what did not run.

    Args:
        info: a Run's ``interrupted`` dict ({'signal', 'exit_code', 'in_progress', 'not_run'}).
        what: the word for the units that did not run ('checks', 'jobs').
    """
    not_run = info.get("not_run") or []
    cur = info.get("in_progress")
    lines = [f"**INTERRUPTED** by {info.get('signal', 'a signal')} (exit code {info.get('exit_code', '?')}): "
             f"a partial report; the verdicts below cover only the {what} that finished.", ""]
    lines.append(f"- {what} not run: {', '.join(not_run) if not_run else 'none'}"
                 + (f" ({cur} was running and was stopped; its results were not kept)" if cur else ""))
    return lines


def write_markdown(run: Run, run_dir: Path) -> Path:
    """Write summary.md (see :func:`markdown`) into run_dir; returns its path."""
    p = Path(run_dir) / "summary.md"
    p.write_text(markdown(run))
    return p


def write_junit(run: Run, run_dir: Path) -> Path:
    """JUnit XML: one testsuite per check, one testcase per cell. FAIL -> failure, ERROR -> error,
    SKIP -> skipped, PARTIAL -> passed with a system-out note (``--strict`` is a CLI exit-code rule)."""
    suites = ET.Element("testsuites", name=f"turbo-harness {run.run_id}")
    if run.interrupted:  # every check that did not run is an error case: a partial run never reads as green
        info = run.interrupted
        s = ET.SubElement(suites, "testsuite", name="INTERRUPTED", tests=str(max(len(info.get("not_run", [])), 1)),
                          failures="0", errors=str(max(len(info.get("not_run", [])), 1)), skipped="0")
        for cid in info.get("not_run") or ["run"]:
            tc = ET.SubElement(s, "testcase", classname="INTERRUPTED", name=f"{cid} not run")
            ET.SubElement(tc, "error", message=f"INTERRUPTED by {info.get('signal')}: {cid} did not run"
                          + (" (stopped while running)" if cid == info.get("in_progress") else ""))
    for c in run.checks:
        s = ET.SubElement(suites, "testsuite", name=c.id, tests=str(max(len(c.cells), 1)), time=f"{c.duration_s:.3f}",
                          failures=str(sum(x.verdict == Verdict.FAIL for x in c.cells)),
                          errors=str(sum(x.verdict == Verdict.ERROR for x in c.cells) + (1 if c.error else 0)),
                          skipped=str(sum(x.verdict == Verdict.SKIP for x in c.cells)))
        if c.error:
            tc = ET.SubElement(s, "testcase", classname=c.id, name="check")
            ET.SubElement(tc, "error", message=c.error)
        for x in c.cells:
            tc = ET.SubElement(s, "testcase", classname=f"{c.id}.{x.type}", name=f"{x.path} {x.metric}")
            msg = f"{x.metric}={fmt_num(x.value)} threshold {x.op} {fmt_num(x.threshold)}: {x.caveat}"
            if x.verdict == Verdict.FAIL:
                ET.SubElement(tc, "failure", message=msg)
            elif x.verdict == Verdict.ERROR:
                ET.SubElement(tc, "error", message=msg)
            elif x.verdict == Verdict.SKIP:
                ET.SubElement(tc, "skipped", message=x.caveat or "skipped")
            elif x.verdict == Verdict.PARTIAL:
                ET.SubElement(tc, "system-out").text = f"PARTIAL: {msg}"
    p = Path(run_dir) / "junit.xml"
    ET.ElementTree(suites).write(p, encoding="utf-8", xml_declaration=True)
    return p


def write_all(run: Run, run_dir: Path) -> list[Path]:
    """Write run.json, summary.md and junit.xml into run_dir (created if needed); returns the paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = [write_json(run, run_dir), write_markdown(run, run_dir), write_junit(run, run_dir)]
    try:  # the HTML page with plots, when its renderer is present
        from harness.report import html as html_renderer
        if hasattr(html_renderer, "write_html"):
            out.append(html_renderer.write_html(run, run_dir))
    except ImportError:
        pass
    return out
