"""Renderers of one :class:`~harness.report.model.Run`: JSON (machines), Markdown (people), JUnit XML (CI)."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.report.facts import fmt_num, run_facts, sweep_setup_line
from harness.report.model import Run, Table, Verdict
from harness.runners.llama_logs import kld_shown


# cell metrics whose value is a KLD itself (not a difference of two, which may be negative): shown through kld_shown
KLD_METRICS = ("kld_noise_floor", "noise_floor", "cross_compared", "cross_kld_vs_floor")


def write_json(run: Run, run_dir: Path) -> Path:
    """Write run.json (schema turbo-harness/run, versioned) into run_dir, whole or not at all (a run killed mid-write
    keeps the previous one; a reader never sees half a file); returns its path."""
    p, tmp = Path(run_dir) / "run.json", Path(run_dir) / ".run.json.tmp"
    tmp.write_text(json.dumps(run.to_dict(), indent=1, default=str))
    os.replace(tmp, p)
    return p


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def known_markdown(run: Run) -> list[str]:
    """The known-findings table (every entry, its status per path and reason), or [] without a file."""
    known = run.sections.get("known")
    if not isinstance(known, dict) or not known.get("entries"):
        return []
    c = known.get("counts", {})
    lines = ["## Known findings", "",
             f"File `{known.get('file')}`: gate **{known.get('gate')}** - {c.get('xfail', 0)} expected (XFAIL), "
             f"{c.get('grown', 0)} grown, {c.get('new', 0)} new, {c.get('xpass', 0)} fixed (XPASS), "
             f"{c.get('unmeasured', 0)} not measured cells/paths.", "",
             "| check | type | path | metric | accepted | status | reason |", "|---|---|---|---|---|---|---|"]
    for e in known["entries"]:
        for pat, st in (e.get("status") or {p: "-" for p in e["paths"]}).items():
            lines.append(f"| {e['check']} | {e['type']} | `{pat}` | {e['metric']} | {e.get('verdict', '')} at "
                         f"{fmt_num(e.get('accepted'))} | {st.upper()} | {_md_escape(e['reason'])} |")
    return lines + [""]


def _detail_table(c) -> list[str]:
    """A check's comparison table from its cells' ``details['table_row']`` (e.g. PQ5 with q4_0/q8_0 beside
    every turbo row); [] when no cell has one."""
    rows = [x for x in c.cells if isinstance(x.details.get("table_row"), dict)]
    if not rows:
        return []
    cols = list(dict.fromkeys(k for x in rows for k in x.details["table_row"]))
    lines = ["", "| type | path | " + " | ".join(cols) + " | verdict |", "|---|---|" + "---|" * len(cols) + "---|"]
    for x in rows:
        tr = x.details["table_row"]
        lines.append(f"| {x.type} | `{x.path}` | " + " | ".join(_md_escape(fmt_num(tr.get(k))) for k in cols)
                     + f" | {x.verdict.value} |")
    return lines


def table_markdown(table: Table, level: int = 3) -> list[str]:
    """A check's :class:`Table` as Markdown lines: heading, caption lines, a pipe table (numbers via
    :func:`fmt_num`, None as '-'), its plot and evidence files."""
    lines = [f"{'#' * level} {table.title}", ""]
    lines += [ln for c in table.caption for ln in (c, "")]
    if table.rows:
        lines += ["| " + " | ".join(_md_escape(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(_md_escape(fmt_num(v)) for v in r) + " |" for r in table.rows]
        lines.append("")
    if table.image:
        lines += [f"![{_md_escape(table.title)}]({table.image})", ""]
    if table.evidence:
        lines += ["evidence: " + " ".join(f"[{Path(e).name}]({e})" for e in table.evidence), ""]
    return lines


def sweep_table_text(section: dict) -> str:
    """The sweep table for the console: fixed-width columns separated by two spaces."""
    ratio_cols = sorted({c for r in section["rows"] for c in r if c.startswith(("pp_ratio_d", "tg_ratio_d"))},
                        key=lambda c: (c[:2], int(c.split("_d")[-1])))
    heads = ["pair", "PPL ± se", "vs q8_0", "KLD", "top1%", "KV MiB", "bits"] + [c.replace("_ratio_d", "@") for c in ratio_cols]
    table = []
    for r in section["rows"]:
        def g(key):
            v = r.get(key)
            return "-" if not isinstance(v, (int, float)) else (f"{v:.3g}" if abs(v) < 0.1 else f"{v:.2f}")
        def f(key, fmt):
            v = kld_shown(r.get(key)) if key == "kld" else r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        ppl = f"{f('ppl', '.3f')} ± {f('ppl_se', '.3f')}" if r.get("ppl") is not None else "-"
        vs = f"{r['ppl_vs_q8_pct']:+.2f}%" if r.get("ppl_vs_q8_pct") is not None else "-"
        table.append([r["pair"], ppl, vs, f("kld", ".4f"), f("same_top_p_pct", ".1f"), f("kv_mib", ".2f"),
                      f("bits_per_value", ".2f")] + [g(c) for c in ratio_cols]
                     + [f"{r.get('status')}{(': ' + r['error'][:160]) if r.get('error') else ''}"
                        + (f"; placement: {r['placement']}" if r.get("placement") else "")])
    widths = [max(len(str(x)) for x in col) for col in zip(heads + ["status"], *table)]

    def line(cells):
        out = [str(cells[0]).ljust(widths[0])] + [str(x).rjust(w) for x, w in zip(cells[1:-1], widths[1:-1])]
        return "  ".join(out + [str(cells[-1])])
    return "\n".join([line(heads + ["status"])] + [line(r) for r in table])


def sweep_markdown(section: dict) -> list[str]:
    """The sweep's per-pair table for summary.md (PPL, paired change vs q8_0, KLD, top-1, memory, status)."""
    rows = section.get("rows") or []
    if not rows:
        return []
    lines = ["", "| pair | PPL ± se | vs q8_0 | KLD | top-1 same % | KV MiB | bits / real value | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{fmt_num(r.get('ppl'))} ± {fmt_num(r.get('ppl_se'))}" if r.get("ppl") is not None else "-"
        vs = f"{r['ppl_vs_q8_pct']:+.2f}%" if r.get("ppl_vs_q8_pct") is not None else "-"
        st = r.get("status", "") + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['pair']} | {ppl} | {vs} | {fmt_num(kld_shown(r.get('kld')))} | {fmt_num(r.get('same_top_p_pct'))} | "
                     f"{fmt_num(r.get('kv_mib'))} | {fmt_num(r.get('bits_per_value'))} | {_md_escape(st)} |")
    return lines


def markdown(run: Run) -> str:
    """The human summary: the verdict and one plain line per finding first, then the overview table,
    what was measured with what, per-check tables, sections and what was not run."""
    from harness.report.findings import gate_summary, headline
    head = headline(run)
    lines = [f"# turbo-harness run `{run.run_id}`: **{gate_summary(run)}**", ""]
    if run.interrupted:
        lines += interrupted_lines(run.interrupted, run.interrupted.get("units", "checks")) + [""]
    lines += [f"**{_md_escape(head[0])}**", ""]
    lines += [f"- {_md_escape(h)}" for h in head[1:]]
    setup = sweep_setup_line(run)
    if setup:
        lines += ["", setup]
    lines.append("")
    lines += known_markdown(run)
    lines += ["## Verdicts", "", "| check | verdict | cells (pass/partial/fail/skip/error) | time s |", "|---|---|---|---|"]
    for c in run.checks:
        counts = [sum(1 for x in c.cells if x.verdict == v) for v in
                  (Verdict.PASS, Verdict.PARTIAL, Verdict.FAIL, Verdict.SKIP, Verdict.ERROR)]
        lines.append(f"| {c.id} {_md_escape(c.title)} | **{run.verdict_label(c)}** | {'/'.join(map(str, counts))} | {c.duration_s:.1f} |")
    lines += ["", "## Run", ""] + [f"- **{k}**: {_md_escape(v)}" for k, v in run_facts(run)]
    for c in run.checks:
        lines += ["", f"## {c.id} {c.title}: {run.verdict_label(c)}", ""]
        if c.error:
            lines.append(f"ERROR: {_md_escape(c.error)}")
        for n in c.notes:
            lines.append(f"- {_md_escape(n)}")
        if c.id == "SWEEP" and isinstance(run.sections.get("sweep"), dict):
            lines += sweep_markdown(run.sections["sweep"])
        for t in c.tables:
            lines += [""] + table_markdown(t)
        if not c.cells:
            continue
        lines += _detail_table(c)
        lines += ["", "| type | path | metric | value | threshold | margin | verdict | note | evidence |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in c.cells:
            tgt = "" if x.target else " (non-target)"
            ev = " ".join(f"[{Path(e).name}]({e})" for e in x.evidence) or ("run.json" if x.details else "-")
            kn = f" (known: {x.known['status'].upper()})" if x.known else ""
            val = kld_shown(x.value) if x.metric in KLD_METRICS else x.value  # display only: run.json keeps it
            lines.append(f"| {x.type} | `{x.path}`{tgt} | {x.metric} | {fmt_num(val)} | {x.op} {fmt_num(x.threshold)} | "
                         f"{fmt_num(x.margin)} | {x.verdict.value}{kn} | {_md_escape(x.caveat)} | {ev} |")
    for name, sec in run.sections.items():  # free-form sections of reports written before checks returned tables
        if isinstance(sec, dict) and sec.get("markdown"):
            lines += ["", sec["markdown"]]
    lines += ["", "Exit code rule: 0 no FAIL/ERROR, 1 a FAIL (or PARTIAL with --strict), 2 an ERROR or bad usage; "
                  "with --known FILE: 0 when every finding is an accepted known one, 1 a new, grown or fixed (XPASS) one.", ""]
    return "\n".join(lines)


def interrupted_lines(info: dict, what: str = "checks") -> list[str]:
    """Markdown lines that mark a partial report: the signal, the exit code and what did not run.

    Args:
        info: a Run's ``interrupted`` dict ({'signal', 'exit_code', 'in_progress', 'not_run'}).
        what: the word for the units that did not run ('checks', 'jobs').
    """
    from harness.unfinished import cause, is_running
    not_run = info.get("not_run") or []
    cur = info.get("in_progress")
    live = is_running(info)
    code = "" if live else f" (exit code {info.get('exit_code', '?')})"
    lines = [f"**{'RUNNING' if live else 'INTERRUPTED'}** {cause(info)}{code}: "
             f"a partial report; the verdicts below cover only the {what} that finished.", ""]
    lines.append(f"- {what} not run{' yet' if live else ''}: {', '.join(not_run) if not_run else 'none'}"
                 + ("" if live or not cur else f" ({cur} was running and was stopped; its results were not kept)"))
    earlier = info.get("earlier") if isinstance(info.get("earlier"), dict) else {}
    if earlier:
        lines.append("- shown from the earlier run in this folder, not this one (marked \"earlier run\"): "
                     + ", ".join(f"{k} ({v})" for k, v in earlier.items()))
    return lines


def write_markdown(run: Run, run_dir: Path) -> Path:
    """Write summary.md (see :func:`markdown`) into run_dir; returns its path."""
    p = Path(run_dir) / "summary.md"
    p.write_text(markdown(run))
    return p


def write_junit(run: Run, run_dir: Path) -> Path:
    """JUnit XML: one testsuite per check, one testcase per cell. FAIL -> failure, ERROR -> error,
    SKIP -> skipped, PARTIAL -> passed with a system-out note (``--strict`` is a CLI exit-code rule).
    With a known-findings file applied: an accepted finding is skipped (type xfail), a grown one and a new
    PARTIAL are failures, and each entry that no longer occurs (XPASS) is a failure of suite 'known-findings'."""
    suites = ET.Element("testsuites", name=f"turbo-harness {run.run_id}")
    if run.interrupted:  # every check that did not run is an error case: a partial run never reads as green
        from harness.unfinished import cause, is_running
        info, word = run.interrupted, run.headline  # RUNNING while the run goes (harness.unfinished)
        s = ET.SubElement(suites, "testsuite", name=word, tests=str(max(len(info.get("not_run", [])), 1)),
                          failures="0", errors=str(max(len(info.get("not_run", [])), 1)), skipped="0")
        for cid in info.get("not_run") or ["run"]:
            tc = ET.SubElement(s, "testcase", classname=word, name=f"{cid} not run")
            ET.SubElement(tc, "error", message=f"{word} {cause(info)}: {cid} "
                          + ("has not run yet" if is_running(info) else "did not run"
                             + (" (stopped while running)" if cid == info.get("in_progress") else "")))
    known = run.sections.get("known")
    gated = isinstance(known, dict) and "entries" in known
    for c in run.checks:
        s = ET.SubElement(suites, "testsuite", name=c.id, tests=str(max(len(c.cells), 1)), time=f"{c.duration_s:.3f}")
        props = ET.SubElement(s, "properties")
        ET.SubElement(props, "property", name="title", value=c.title)
        ET.SubElement(props, "property", name="verdict", value=run.verdict_label(c))
        earlier = c.id in run.earlier()  # an interrupted run's stale check: no testcase passes as this run's
        if earlier:
            ET.SubElement(props, "property", name="earlier_run", value="not run by this (interrupted) run: results "
                                                                       "of the earlier run in this folder")
        if c.error:
            tc = ET.SubElement(s, "testcase", classname=c.id, name="check")
            ET.SubElement(tc, "error", message=c.error)
        for x in c.cells:
            tc = ET.SubElement(s, "testcase", classname=f"{c.id}.{x.type}", name=f"{x.path} {x.metric}")
            msg = f"{x.metric}={fmt_num(x.value)} threshold {x.op} {fmt_num(x.threshold)}: {x.caveat}"
            if earlier:  # the earlier run's result: never a pass of this run; its failures stay marked as earlier
                msg = f"earlier run's {x.verdict.value}, not run by this interrupted run: {msg}"
                if x.verdict in (Verdict.PASS, Verdict.PARTIAL):
                    ET.SubElement(tc, "skipped", message=msg)
                    continue
            status = (x.known or {}).get("status")
            if status == "xfail":  # an accepted known finding: reported as pytest reports xfail
                ET.SubElement(tc, "skipped", type="xfail",
                              message=f"expected {x.verdict.value} (known finding: {x.known.get('reason')}): {msg}")
            elif status == "grown":
                ET.SubElement(tc, "failure", message=f"{x.verdict.value} worse than the known finding accepted at "
                                                     f"{fmt_num(x.known.get('accepted'))}: {msg}")
            elif status == "not measured":  # harness.known.not_measured: no value to check the entry on
                ET.SubElement(tc, "failure", message=f"{x.verdict.value} not measured: the known finding cannot be checked: {msg}")
            elif gated and x.verdict == Verdict.PARTIAL:
                ET.SubElement(tc, "failure", message=f"new PARTIAL finding (not in the known-findings file): {msg}")
            elif x.verdict == Verdict.FAIL:
                ET.SubElement(tc, "failure", message=msg)
            elif x.verdict == Verdict.ERROR:
                ET.SubElement(tc, "error", message=msg)
            elif x.verdict == Verdict.SKIP:
                ET.SubElement(tc, "skipped", message=x.caveat or "skipped")
            elif x.verdict == Verdict.PARTIAL:
                ET.SubElement(tc, "system-out").text = f"PARTIAL: {msg}"
        sweep = sweep_markdown(run.sections["sweep"]) if c.id == "SWEEP" and isinstance(run.sections.get("sweep"), dict) else []
        if c.notes or c.tables or sweep:  # what the check reported besides its cells, as text (JUnit has no tables)
            ET.SubElement(s, "system-out").text = "\n".join(
                [f"- {n}" for n in c.notes] + sweep + [ln for t in c.tables for ln in [""] + table_markdown(t)])
    if gated:
        s = ET.SubElement(suites, "testsuite", name="known-findings", tests=str(len(known["entries"])))
        for e in known["entries"]:
            for pat, st in e.get("status", {}).items():
                tc = ET.SubElement(s, "testcase", classname=f"known.{e['check']}.{e['type']}", name=f"{pat} {e['metric']}")
                if st == "xpass":
                    ET.SubElement(tc, "failure", message=f"XPASS: the known finding no longer occurs (fixed); remove it "
                                                         f"from {known.get('file')}")
                elif st == "not checked":
                    ET.SubElement(tc, "skipped", message="not measured in this run")
    for s in suites:  # counts from the testcases themselves, so xfail/xpass are counted where they are written
        cases = [tc for tc in s if tc.tag == "testcase"]
        for tag, attr in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            s.set(attr, str(sum(1 for tc in cases for ch in tc if ch.tag == tag)))
        s.set("tests", str(max(len(cases), 1)))
    p = Path(run_dir) / "junit.xml"
    ET.ElementTree(suites).write(p, encoding="utf-8", xml_declaration=True)
    return p


def _write_html(run: Run, run_dir: Path) -> Path:
    from harness.report.html import write_html  # imported when used: it pulls in matplotlib for the plots
    return write_html(run, run_dir)


# The output formats: (file name, writer(run, run_dir) -> path). Each renders every part of a Run: verdicts,
# findings, run facts, each check's notes, tables and cells, the known-findings gate, interrupted state.
# A new output format is one writer added here (README "Adding an output format").
RENDERERS: tuple[tuple[str, object], ...] = (
    ("run.json", write_json),
    ("summary.md", write_markdown),
    ("junit.xml", write_junit),
    ("report.html", _write_html),
)


def write_all(run: Run, run_dir: Path, renderers=None) -> list[Path]:
    """Write every output format of ``renderers`` (default :data:`RENDERERS`: run.json, summary.md, junit.xml,
    report.html) into run_dir (created if needed); returns the paths written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return [write(run, run_dir) for _, write in (RENDERERS if renderers is None else renderers)]
