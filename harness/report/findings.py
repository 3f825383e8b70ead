"""The answer first: a run's verdict and one plain line per finding, for every renderer and the console.

A *finding* is a group of cells of one check that are not PASS/SKIP and share the verdict, type,
metric and known-findings status (see :mod:`harness.known`); its line says what is wrong, on which
type and paths, by how much (the worst value against its limit) and what it means for a user (one
sentence per check and metric from ``checks/meanings.toml``).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from harness.report.model import EARLIER_MARK, Cell, Run, Verdict

MEANINGS_FILE = Path(__file__).resolve().parents[2] / "checks" / "meanings.toml"
_BAD = (Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR)


@lru_cache(maxsize=4)
def load_meanings(path: Path | None = None) -> dict:
    """{check id: {metric or 'default': sentence}} from checks/meanings.toml ({} when the file is absent)."""
    p = Path(path or MEANINGS_FILE)
    try:
        return tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def meaning(check: str, metric: str, verdict: Verdict) -> str:
    """The one-sentence meaning of a finding of ``check`` on ``metric`` ('' when none is written down)."""
    m = load_meanings()
    if verdict == Verdict.ERROR:
        return m.get("ERROR", {}).get("default", "")
    sec = m.get(check, {})
    return sec.get(metric) or sec.get("default", "")


def fmt(v) -> str:
    """A number for a finding line: 4 significant digits, '-' for None."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass
class Finding:
    """Cells of one check sharing verdict, type, metric and known status, summarised by the worst one."""

    check: str
    verdict: Verdict
    type: str
    metric: str
    cells: list[Cell] = field(default_factory=list)
    known: str = ""          # '' (not in a known-findings file), 'xfail' or 'grown'
    reason: str = ""         # the known-findings entry's reason
    accepted: float | None = None
    error: str = ""          # a check-level error (no cell)
    root: int = 0            # the root cause (1-based, harness.report.rootcause) it follows from; 0 for none
    earlier: bool = False    # a check an interrupted run did not run: the earlier run's finding (Run.earlier)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(c.path for c in self.cells))

    @property
    def worst(self) -> Cell | None:
        """The cell farthest beyond its limit (the first one when values are missing)."""
        vals = [c for c in self.cells if c.value is not None]
        if not vals:
            return self.cells[0] if self.cells else None
        return min(vals, key=lambda c: c.margin if c.margin is not None else 0.0)

    @property
    def label(self) -> str:
        """'FAIL', 'PARTIAL', 'ERROR', or 'XFAIL' (an accepted known finding) / 'GROWN' (beyond its accepted value)."""
        return {"xfail": "XFAIL", "grown": "GROWN"}.get(self.known, self.verdict.value)

    def line(self) -> str:
        """One plain line: label, check, type, paths, value against its limit, the cell's note, what it means."""
        if self.error:
            return (f"ERROR   {self.check}{' ' + EARLIER_MARK if self.earlier else ''}: {self.error}. Means: "
                    f"{meaning(self.check, '-', Verdict.ERROR)}")
        w = self.worst
        paths = self.paths
        where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        head = f"{self.label:<8}{self.check} {EARLIER_MARK + ' ' if self.earlier else ''}{self.type} on {where}"
        if w is not None and w.value is not None:
            how = f"{self.metric} = {fmt(w.value)}" + (f", limit {w.op} {fmt(w.threshold)}" if w.threshold is not None else "")
        else:
            how = "not measured"
        note = f" ({w.caveat})" if w is not None and w.caveat else ""
        text = f"{head}: {how}{note}."
        if self.known:
            acc = f" accepted at {fmt(self.accepted)}" if self.accepted is not None else ""
            text += (f" Expected (known finding{acc}: {self.reason})." if self.known == "xfail" else
                     f" The known finding{acc} ({self.reason}) cannot be checked without a value: not accepted."
                     if self.known == "not measured" else f" Worse than the known finding{acc} ({self.reason}): a regression.")
        cause = w.details.get("cause") if w is not None and isinstance(w.details, dict) else None
        if cause and load_meanings().get("CAUSE", {}).get(cause):
            mean = load_meanings()["CAUSE"][cause]  # what the evidence shows directly (e.g. all-zero indices)
        elif w is not None and w.value is None and self.verdict == Verdict.FAIL and _crashed(w):
            mean = load_meanings().get("CRASH", {}).get("default", "")  # a fork crash left nothing to judge
        else:
            mean = meaning(self.check, self.metric, self.verdict)
        text += f" Means: {mean}" if mean else ""
        return text + (f" Follows from root cause {self.root} above." if self.root else "")


def _crashed(cell: Cell) -> bool:
    """Whether the cell's own note says the fork crashed or failed (only then is the crash meaning shown)."""
    c = (cell.caveat or "").lower()
    return any(w in c for w in ("crash", "fork failure", "signal", "aborted"))


def findings(run: Run) -> list[Finding]:
    """Every finding of a run, in check order, FAIL/ERROR before PARTIAL, accepted (XFAIL) ones last."""
    out: list[Finding] = []
    for c in run.checks:
        if c.error:
            out.append(Finding(c.id, Verdict.ERROR, "all", "-", error=c.error))
        groups: dict[tuple, Finding] = {}
        for x in c.cells:
            if x.verdict not in _BAD:
                continue
            k = (x.verdict.value, x.type, x.metric, (x.known or {}).get("status", ""))
            f = groups.get(k)
            if f is None:
                kn = x.known or {}
                f = groups[k] = Finding(c.id, x.verdict, x.type, x.metric, known=kn.get("status", ""),
                                        reason=kn.get("reason", ""), accepted=kn.get("accepted"))
            f.cells.append(x)
        out += groups.values()
    from harness.report.rootcause import root_causes
    roots = root_causes(run)
    stale = run.earlier()
    for f in out:
        f.earlier = f.check in stale
        f.root = next((i for i, r in enumerate(roots, 1) for x in f.cells if r.covers(f.check, x)), 0)
    order = {"FAIL": 0, "ERROR": 0, "GROWN": 0, "PARTIAL": 1, "XFAIL": 2}
    return sorted(out, key=lambda f: order.get(f.label, 1))


def root_lines(run: Run) -> list[str]:
    """'ROOT 1  <sentence>' per root cause several findings share (harness.report.rootcause), in order."""
    from harness.report.rootcause import root_causes
    return [f"ROOT {i}  {r.text}" for i, r in enumerate(root_causes(run), 1) if r.text]


def _n(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def judged_anything(run: Run) -> bool:
    """True when a cell of the run holds a judged measurement (PASS, PARTIAL or FAIL); a run whose cells are all SKIP
    or ERROR measured nothing, and no known-findings gate makes that a PASS (spec: nothing measured is never PASS)."""
    return any(x.verdict in (Verdict.PASS, Verdict.PARTIAL, Verdict.FAIL) for c in run.checks for x in c.cells)


def verdict_line(run: Run) -> str:
    """'FAIL: 1 failing, 1 partial finding' (or 'PASS: every judged cell passed'). With a known-findings file applied
    the gate leads, as the command's exit code does, and the known findings are named with the verdicts it accepted:
    'known-findings gate PASS: 5 known findings (their FAIL and PARTIAL verdicts accepted by --known k.toml)'."""
    fs = findings(run)
    v = run.verdict.value
    counts: dict[str, int] = {}
    for f in fs:  # a known finding whose cells hold no value is counted apart (harness.known.not_measured)
        key = "UNMEASURED" if f.known == "not measured" else f.label
        counts[key] = counts.get(key, 0) + 1
    words = {"FAIL": "failing", "ERROR": "not measured (ERROR)", "GROWN": "grown beyond accepted",
             "PARTIAL": "partial", "XFAIL": "expected (known)", "UNMEASURED": "not measured (known findings not checked)"}
    known = run.sections.get("known")
    gate = known.get("gate") if isinstance(known, dict) else None
    if gate:  # the gate's result first; what it accepted named, never hidden
        accepted = [x for x in ("FAIL", "ERROR", "PARTIAL") if any(f.label == "XFAIL" and f.verdict.value == x for f in fs)]
        words.update(FAIL="new failing", PARTIAL="new partial")  # any finding not in the file is new
        parts = [f"{counts[k]} {words[k]}" for k in ("FAIL", "GROWN", "ERROR", "PARTIAL", "UNMEASURED") if k in counts]
        xpass = int((known.get("counts") or {}).get("xpass") or 0)
        parts += [f"{xpass} fixed (XPASS: remove from the file)"] if xpass else []
        if counts.get("XFAIL"):
            its = "its" if counts["XFAIL"] == 1 else "their"
            parts.append(f"{_n(counts['XFAIL'], 'known finding')} ({its} {' and '.join(accepted)} verdict"
                         f"{'' if counts['XFAIL'] == 1 else 's'} accepted by --known {Path(str(known.get('file') or '?')).name})")
        if not judged_anything(run):  # the gate may pass (exit 0), but the run measured nothing: never led by PASS
            text = f"{v}: nothing was judged (" + "".join(f"{p}; " for p in parts) + f"known-findings gate {gate})"
        else:
            text = f"known-findings gate {gate}: " + (", ".join(parts) if parts else "every judged cell passed")
    elif not fs:
        skipped = sum(x.verdict == Verdict.SKIP for c in run.checks for x in c.cells)
        if v == "PASS":
            text = f"{v}: every judged cell passed"
        elif judged_anything(run):  # PASS cells beside SKIP ones: the run is SKIP (not all examined), yet not empty
            text = f"{v}: every judged cell passed, {_n(skipped, 'cell')} skipped (see their reasons)"
        else:
            text = f"{v}: nothing was judged"
    else:
        parts = [f"{counts[k]} {words[k]}" for k in ("FAIL", "GROWN", "ERROR", "PARTIAL", "XFAIL") if k in counts]
        text = f"{v}: " + ", ".join(parts) + (" finding" if sum(counts.values()) == 1 else " findings")
    if run.interrupted:
        shown = f"; {', '.join(run.earlier())} shown from the earlier run" if run.earlier() else ""
        yet = " yet" if run.headline == "RUNNING" else ""  # a run still going (harness.unfinished)
        text = (f"{run.headline} (partial run, not run{yet}: {', '.join(run.interrupted.get('not_run') or []) or 'none'}"
                f"{shown}); what ran: " + text)  # the verdict of a part, never the run's own
    exam = next((tb for c in run.checks for tb in c.tables if tb.id == "examination" and tb.caption), None)
    if exam is not None:  # which backends ran and which were only read (spec "Every backend, and how it was examined")
        text += f" [{exam.caption[0]}]"
    elif isinstance(run.meta.get("backend_modes"), dict) and run.meta["backend_modes"]:
        text += f" [{_modes_line(run.meta)}]"  # no AUDIT in this report: what ran, and that nothing was audited
    return text


def gate_summary(run: Run) -> str:
    """The run's result as its command's exit code gives it, for titles and the scorecard: without a known-findings
    gate (or for an interrupted run) :attr:`Run.headline`; with one, the gate's word from
    :func:`harness.known.gate_exit_code` (0 PASS, 1 FAIL, 2 ERROR) and the findings it saw, e.g. 'PASS (known-findings
    gate; 5 known findings)' or 'FAIL (known-findings gate; 1 new, 2 known findings)': findings are never hidden. A
    gated run that judged nothing (every cell SKIP, or accepted ERRORs only) leads with its own verdict, never PASS:
    'SKIP (nothing judged; known-findings gate PASS)'."""
    known = run.sections.get("known")
    if run.interrupted or not isinstance(known, dict) or not known.get("gate"):
        return run.headline
    from harness.known import gate_exit_code
    fs = findings(run)
    if known.get("gate") == "SKIP" and not fs:
        return "SKIP (known-findings gate; nothing judged)"
    word = {0: "PASS", 1: "FAIL"}.get(gate_exit_code(run), "ERROR")
    n = {lab: sum(f.label == lab for f in fs) for lab in ("XFAIL", "GROWN")}
    unmeasured = sum(f.known == "not measured" for f in fs)
    new = len(fs) - n["XFAIL"] - n["GROWN"] - unmeasured
    xpass = int((known.get("counts") or {}).get("xpass") or 0)
    parts = ([f"{new} new"] if new else []) + ([f"{n['GROWN']} grown"] if n["GROWN"] else []) + (
        [f"{unmeasured} not measured"] if unmeasured else []) + (
        [f"{xpass} fixed (XPASS)"] if xpass else []) + ([_n(n["XFAIL"], "known finding")] if n["XFAIL"] else [])
    if not judged_anything(run):  # nothing measured is never PASS, whatever the gate accepted
        return f"{run.verdict.value} (nothing judged; known-findings gate {word}" + "".join(f"; {p}" for p in parts) + ")"
    return f"{word} (known-findings gate; {', '.join(parts) or 'no findings'})"


def _modes_line(meta: dict) -> str:
    """'executed: cpu; executed on a software device: vulkan; not examined: cuda, metal, hip (no source audit in this
    report)' from a verify run's ``backend_modes`` and ``backends_not_available`` (a report without AUDIT's
    examination table)."""
    from harness.targets.base import MODES
    by: dict[str, list[str]] = {}
    for name, m in meta["backend_modes"].items():
        m = m if isinstance(m, dict) else {}
        fam = m.get("of") or name
        by.setdefault(MODES.get(m.get("mode", "executed"), str(m.get("mode"))), []).append(
            fam if fam == name else f"{fam} ({name})")
    parts = [f"{k}: {', '.join(v)}" for k, v in by.items()]
    ran = {(m.get("of") if isinstance(m, dict) else None) or n for n, m in meta["backend_modes"].items()}
    none = [b for b in meta.get("backends_not_available") or [] if b not in ran]
    if none:
        parts.append(f"not examined: {', '.join(none)}")
    return "; ".join(parts) + " (no source audit in this report)"


def headline(run: Run) -> list[str]:
    """The lines every report and the console start with: the verdict, one line per finding, and
    the known-findings entries that no longer occur (XPASS) or were not checked."""
    lines = [verdict_line(run)] + root_lines(run) + [f.line() for f in findings(run)]
    known = run.sections.get("known")
    if isinstance(known, dict):
        for e in known.get("entries", []):
            for pat, st in e.get("status", {}).items():
                if st == "xpass":
                    lines.append(f"XPASS   {e['check']} {e['type']} on {pat}: the known finding ({e['metric']}, accepted "
                                 f"at {fmt(e.get('accepted'))}) no longer occurs. Means: it was fixed; remove it from "
                                 f"{known.get('file')} so the gate goes green")
    return lines
