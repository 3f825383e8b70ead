"""The known-findings gate: findings a team has accepted, each with a reason and the value it was
accepted at, so that CI stays green on them and goes red on anything new.

A known-findings file (TOML, e.g. ``checks/known-findings.toml``, passed with ``--known FILE``)
holds ``[[finding]]`` entries::

    [[finding]]
    check = "PQ5"                       # check id
    type = "turbo4"                     # the cell's type (a pair such as "q8_0/turbo3" for PQ6/SWEEP)
    paths = ["cpu:set_rows"]            # or path = "..."; shell-style patterns (cpu:*) allowed
    metric = "nmse_over_lloyd_max"      # the cell's metric
    verdict = "FAIL"                    # the worst verdict accepted (default FAIL)
    accepted = 1.95                     # the measured value accepted (optional: without it any value is accepted)
    slack = 0.01                        # relative room above ``accepted`` before it counts as grown (default 0.01)
    reason = "why this is accepted"     # required, one line

Outcomes (pytest's words): a finding matching an entry within its accepted verdict and value is
XFAIL (reported, does not fail the gate); one worse than the entry (value beyond accepted x (1 +
slack), a value missing or not finite where the entry accepted one, or a worse verdict) is GROWN and fails; a finding matching no entry is new and fails (with a
known-findings file every non-PASS cell must be listed, PARTIAL included); an entry whose path now
passes is XPASS (fixed) and fails until the file is updated; an entry whose cells were not measured in
this run (check, type or backend not run) is 'not checked' and does not count. A FAIL/PARTIAL cell judged by a
number it does not hold (:func:`harness.report.rejudge.not_measured`) is never XFAIL: its entry is 'not checked' and
the cell fails the gate as 'not measured'. A gate over a run where no cell was judged (all SKIP) is SKIP, never PASS.
"""
from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.report.model import Cell, Run, Verdict
from harness.report.rejudge import not_measured

_KEYS = {"check", "type", "path", "paths", "metric", "verdict", "accepted", "slack", "reason"}
_BAD = (Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR)


@dataclass
class KnownFinding:
    """One accepted finding (see the module docstring for the fields)."""

    check: str
    type: str
    paths: list[str]
    metric: str
    reason: str
    verdict: Verdict = Verdict.FAIL
    accepted: float | None = None
    slack: float = 0.01
    status: dict[str, str] = field(default_factory=dict)  # path pattern -> xfail / grown / xpass / not checked

    def matches(self, check: str, cell: Cell) -> str | None:
        """The path pattern this cell matches, or None."""
        if check != self.check or cell.type != self.type or cell.metric != self.metric:
            return None
        return next((p for p in self.paths if fnmatch.fnmatchcase(cell.path, p)), None)

    def grown(self, cell: Cell) -> bool:
        """True when the cell is worse than accepted: a worse verdict, or a value beyond accepted x (1 + slack).

        With an ``accepted`` value, a cell whose value is missing or not finite (NaN, inf: a fork that now outputs
        NaN gives PQ5 a NaN ratio with the same FAIL verdict) cannot be shown to be within it: grown."""
        if cell.verdict.rank > self.verdict.rank:
            return True
        if self.accepted is None:
            return False
        if not isinstance(cell.value, (int, float)) or not math.isfinite(cell.value):
            return True
        room = abs(self.accepted) * self.slack
        return cell.value > self.accepted + room if cell.op == "<=" else cell.value < self.accepted - room

    def to_dict(self) -> dict:
        return {"check": self.check, "type": self.type, "paths": self.paths, "metric": self.metric,
                "verdict": self.verdict.value, "accepted": self.accepted, "slack": self.slack, "reason": self.reason,
                "status": dict(self.status)}


def load_known(path: str | Path) -> list[KnownFinding]:
    """Read a known-findings file.

    Raises:
        HarnessError: the file is missing or not TOML, or an entry lacks check/type/path/metric/reason,
            has an unknown key, a bad verdict or a non-numeric accepted value (one line naming the entry).
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as e:
        raise HarnessError(f"known-findings file {p} cannot be read ({e.strerror}): give an existing TOML file "
                           f"(see README 'Known findings')") from None
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"known-findings file {p} is not valid TOML ({e}): fix it (see README 'Known findings')") from None
    extra = set(raw) - {"finding"}
    if extra:
        raise HarnessError(f"{p}: unknown table {', '.join(sorted(extra))}: write entries as [[finding]]")
    out = [_entry(e, f"{p}: [[finding]] #{i}") for i, e in enumerate(raw.get("finding", []), 1)]
    if not out:
        raise HarnessError(f"{p} lists no [[finding]] entries: add one or leave --known out")
    return out


def _entry(e, where: str) -> KnownFinding:
    """One entry of a known-findings file (or as stored in run.json), checked. Raises HarnessError (one line, ``where``)."""
    from harness.checks.registry import REGISTRY
    ids = [*REGISTRY.ids(), "SWEEP"]  # every registered check, and the sweep's cells (check SWEEP)
    if not isinstance(e, dict):
        raise HarnessError(f"{where} is not a table: write entries as [[finding]] with check, type, path(s), metric, reason")
    bad = set(e) - _KEYS
    if bad:
        raise HarnessError(f"{where} has unknown key {', '.join(sorted(bad))}: allowed are {', '.join(sorted(_KEYS))}")
    paths = e.get("paths") or ([e["path"]] if e.get("path") else [])
    paths = [paths] if isinstance(paths, str) else paths  # paths = "cpu:*": one pattern, not its characters
    if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
        raise HarnessError(f"{where}: paths must be a list of path patterns, e.g. paths = [\"cpu:set_rows\", \"cuda:*\"]")
    missing = [k for k in ("check", "type", "metric", "reason") if not e.get(k)] + ([] if paths else ["path"])
    if missing:
        raise HarnessError(f"{where} lacks {', '.join(missing)}: every entry names check, type, path(s), metric and a reason")
    if str(e["check"]).upper() not in ids:
        raise HarnessError(f"{where}: check {str(e['check'])!r} is not a check of this harness (it could never "
                           f"match): choose from {', '.join(ids)}")
    try:
        verdict = Verdict(str(e.get("verdict", "FAIL")).upper())
        accepted = None if e.get("accepted") is None else float(e["accepted"])
        slack = float(e.get("slack", 0.01))
    except (ValueError, TypeError):
        verdict = accepted = slack = None
    # NaN compares false, so a NaN accepted/slack would never count a finding as grown (the gate would pass
    # however far it grew); a negative slack or a PASS/SKIP 'worst accepted verdict' has no meaning
    if verdict not in _BAD or slack is None or not (math.isfinite(slack) and slack >= 0) or (
            accepted is not None and not math.isfinite(accepted)):
        raise HarnessError(f"{where}: verdict must be PARTIAL, FAIL or ERROR, accepted a finite number and slack a "
                           f"finite number >= 0 (got verdict {e.get('verdict', 'FAIL')!r}, accepted "
                           f"{e.get('accepted')!r}, slack {e.get('slack', 0.01)!r})")
    return KnownFinding(str(e["check"]).upper(), str(e["type"]), [str(x) for x in paths], str(e["metric"]),
                        str(e["reason"]), verdict, accepted, slack)


def stored_known(run: Run) -> tuple[list[KnownFinding], str] | None:
    """The known-findings entries and file name a run was last judged against (``sections['known']``, written by
    :func:`apply_known`), to judge its re-judged cells again (``report`` without ``--known``); None when it holds
    none. Raises HarnessError (one line) when the stored entries are damaged."""
    known = run.sections.get("known")
    if not isinstance(known, dict) or "entries" not in known:
        return None
    where = f"run.json's stored known-findings gate (sections.known, from {known.get('file')})"
    entries = known["entries"] if isinstance(known["entries"], list) else [None]
    out = [_entry({k: v for k, v in e.items() if k != "status"} if isinstance(e, dict) else e, f"{where}, entry #{i}")
           for i, e in enumerate(entries, 1)]
    if not out:
        raise HarnessError(f"{where} lists no entries: give --known FILE again")
    return out, str(known.get("file") or "?")


def apply_known(run: Run, known: list[KnownFinding], source: str) -> dict:
    """Mark the run's cells against the known findings and store the outcome in ``run.sections['known']``.

    Each non-PASS cell that matches an entry gets ``cell.known = {'status': 'xfail'|'grown'|'not measured',
    'reason', 'accepted'}`` ('not measured': :func:`harness.report.rejudge.not_measured`, never accepted; its entry is
    'not checked'); every entry gets a status per path pattern. Returns the section: {'file', 'entries', 'gate', 'counts'}; the
    gate is 'FAIL' for an error, a new, grown, fixed (XPASS) or not-measured finding, 'SKIP' when no cell of the run
    was judged (nothing measured never passes), else 'PASS'.
    """
    for c in run.checks:
        for x in c.cells:
            x.known = {}
    for e in known:
        e.status = {}
        for pat in e.paths:
            seen_bad, seen_pass, unmeasured = [], False, []
            for c in run.checks:
                for x in c.cells:
                    if e.matches(c.id, x) != pat:
                        continue
                    if x.verdict in _BAD:
                        (unmeasured if not_measured(x) else seen_bad).append(x)
                    elif x.verdict == Verdict.PASS:
                        seen_pass = True
            for x in seen_bad:
                st = "grown" if e.grown(x) else "xfail"
                if (x.known or {}).get("status") != "grown":  # a cell matched twice keeps the worse outcome
                    x.known = {"status": st, "reason": e.reason, "accepted": e.accepted}
            for x in unmeasured:  # no value to check against the entry: never accepted (never XFAIL)
                x.known = {"status": NOT_MEASURED, "reason": e.reason, "accepted": e.accepted}
            if seen_bad:
                e.status[pat] = "grown" if any(x.known.get("status") == "grown" for x in seen_bad) else "xfail"
            else:
                e.status[pat] = "xpass" if seen_pass else "not checked"
    counts = {"xfail": 0, "grown": 0, "new": 0, "xpass": 0, "unmeasured": 0}
    for c in run.checks:
        for x in c.cells:
            if x.verdict in _BAD:
                st = x.known.get("status") or "new"
                counts["unmeasured" if st == NOT_MEASURED else st] += 1
    counts["xpass"] = sum(st == "xpass" for e in known for st in e.status.values())
    errors = any(c.error for c in run.checks)
    judged = errors or any(x.verdict != Verdict.SKIP for c in run.checks for x in c.cells)
    gate = ("FAIL" if errors or counts["grown"] or counts["new"] or counts["xpass"] or counts["unmeasured"]
            else "PASS" if judged else "SKIP")  # a gate over nothing judged is never PASS
    section = {"file": str(source), "entries": [e.to_dict() for e in known], "gate": gate, "counts": counts}
    run.sections["known"] = section
    return section


NOT_MEASURED = "not measured"  # cell.known status of a FAIL/PARTIAL cell an entry matches but cannot check


def clear_known(run: Run) -> bool:
    """Forget a known-findings judgement stored in the run (a later run without ``--known`` must not be
    gated by an earlier file). Returns True when there was one."""
    had = run.sections.pop("known", None) is not None
    for c in run.checks:
        for x in c.cells:
            had = had or bool(x.known)
            x.known = {}
    return had


def gate_exit_code(run: Run, strict: bool = False) -> int:
    """The exit code: :meth:`Run.exit_code` without a known-findings file; with one (``sections['known']``):
    2 an unaccepted ERROR (or a check that errored), 1 a new finding (PARTIAL included), a grown, not-measured one or
    an XPASS, or a gate that judged nothing (SKIP), else 0."""
    known = run.sections.get("known")
    if run.interrupted or not isinstance(known, dict) or "counts" not in known:  # interrupted: 130/143 as verify exits
        return run.exit_code(strict)
    unaccepted = [x for c in run.checks for x in c.cells if x.verdict in _BAD and not x.known]
    if any(c.error for c in run.checks) or any(x.verdict == Verdict.ERROR for x in unaccepted):
        return 2
    return 0 if known["gate"] == "PASS" else 1
