"""One result model for every check and every renderer: run -> checks -> cells.

A *cell* is one measurement of one check on one (type, path) with its value, threshold, margin,
verdict and evidence files. Verdicts are ordered PASS < SKIP < PARTIAL < FAIL < ERROR for
aggregation; SKIP never hides a measured FAIL and ERROR is never shown as a pass.
"""
from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = "1.1"  # 1.1: checks carry structured tables (CheckResult.tables)


class Verdict(str, enum.Enum):
    PASS = "PASS"
    SKIP = "SKIP"
    PARTIAL = "PARTIAL"
    FAIL = "FAIL"
    ERROR = "ERROR"

    @property
    def rank(self) -> int:
        return ["PASS", "SKIP", "PARTIAL", "FAIL", "ERROR"].index(self.value)


def worst(verdicts) -> Verdict:
    """The worst verdict of an iterable (PASS < SKIP < PARTIAL < FAIL < ERROR); SKIP when empty."""
    vs = [Verdict(v) for v in verdicts]
    if not vs:
        return Verdict.SKIP
    return max(vs, key=lambda v: v.rank)


@dataclass
class Cell:
    """One measured cell.

    Attributes:
        check: check id ('PQ1', ..., 'COMPAT', 'SWEEP').
        type: KV type or pair label ('turbo3', 'q8_0/turbo4').
        path: 'backend:route' or a case label.
        metric: what ``value`` measures (e.g. 'max_abs_err').
        value: the measured number (None when not measured).
        threshold: the limit it was judged against, with ``op`` ('<=' or '>=').
        margin: threshold - value for '<=' (positive = inside), value - threshold for '>='.
        verdict: this cell's verdict after target/fallback rules.
        caveat: one line explaining PARTIAL/SKIP/ERROR/FAIL.
        target: whether the path belongs to the production target backend.
        evidence: run-folder-relative evidence file paths.
        details: extra measured numbers (all JSON-serialisable).
        known: set by a known-findings file (harness.known): {'status': 'xfail'|'grown', 'reason', 'accepted'}.
    """

    check: str
    type: str
    path: str
    metric: str
    value: float | None
    threshold: float | None
    verdict: Verdict
    op: str = "<="
    caveat: str = ""
    target: bool = True
    evidence: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    known: dict[str, Any] = field(default_factory=dict)

    @property
    def margin(self) -> float | None:
        if self.value is None or self.threshold is None:
            return None
        try:
            return float(self.threshold - self.value) if self.op == "<=" else float(self.value - self.threshold)
        except TypeError:
            return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        d["margin"] = self.margin
        return d


@dataclass
class Table:
    """A structured table a check returns (coverage, tool output, per-layer values); every renderer shows it.

    Attributes:
        id: stable name within its check ('coverage', 'backend_ops', 'per_layer:smollm2:nmse').
        title: heading shown above it.
        columns: column labels, in order.
        rows: one list per row, one value per column (numbers, strings or None; JSON-serialisable).
        caption: lines of text shown above the rows (what was measured, the command line).
        image: run-folder-relative path of a plot that belongs to the table ('' for none).
        evidence: run-folder-relative evidence files the values come from.
        scope: {'type': column, 'backend': column}: which columns say what a row covers, so that a re-run of the
            check with fewer types or backends replaces only its own rows (:meth:`merge_previous`).
    """

    id: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    image: str = ""
    evidence: list[str] = field(default_factory=list)
    scope: dict[str, str] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        """The rows as {column label: value} dicts."""
        return [dict(zip(self.columns, r)) for r in self.rows]

    def to_dict(self) -> dict:
        """The table as stored in run.json (every field)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        """A table read back from run.json (fields it lacks take their defaults)."""
        return cls(**{k: d[k] for k in ("id", "title", "columns", "rows", "caption", "image", "evidence", "scope") if k in d})

    def from_legacy_section(self, section: Any) -> "Table | None":
        """The same table as a report of schema 1.0 stored it: a free-form ``run.sections[id]`` whose ``rows`` are
        dicts keyed by this table's column labels (COMPAT's coverage); None when the section is not of that shape
        (then it is only replaced)."""
        rows = section.get("rows") if isinstance(section, dict) else None
        if not rows or not all(isinstance(r, dict) and set(self.columns) <= set(r) for r in rows):
            return None
        return Table(self.id, self.title, list(self.columns), [[r[c] for c in self.columns] for r in rows],
                     scope=dict(self.scope))

    def merge_previous(self, old: "Table", types: list[str], backends: list[str]) -> None:
        """Prepend the rows of an earlier run's table that this run did not redo: a row is redone when its scope
        columns (``scope['type']``, ``scope['backend']``) name one of ``types`` and one of ``backends``. A table
        without a scope replaces the earlier one whole."""
        if not self.scope:
            return
        ti = self.columns.index(self.scope["type"]) if "type" in self.scope else None
        bi = self.columns.index(self.scope["backend"]) if "backend" in self.scope else None
        kept = [r for r in old.rows if not ((ti is None or r[ti] in types) and (bi is None or r[bi] in backends))]
        self.rows = kept + [r for r in self.rows if r not in kept]


@dataclass
class CheckResult:
    """All cells of one check, with its aggregated verdict (worst *target* cell, see spec), its notes and tables."""

    id: str
    title: str
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    error: str = ""
    tables: list[Table] = field(default_factory=list)
    not_applicable: str = ""  # why the check could not apply to this target (e.g. no fork source): SKIP, not aggregated

    @property
    def verdict(self) -> Verdict:
        if self.error:
            return Verdict.ERROR
        if not self.cells:
            return Verdict.SKIP
        return worst(c.verdict for c in self.cells)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "verdict": self.verdict.value,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
            "notes": self.notes,
            "cells": [c.to_dict() for c in self.cells],
            "tables": [t.to_dict() for t in self.tables],
            **({"not_applicable": self.not_applicable} if self.not_applicable else {}),
        }


EARLIER_MARK = "(earlier run, not this one)"


@dataclass
class Run:
    """A whole run: metadata, check results and free-form sections (coverage, sweeps, matrix).

    ``interrupted`` is None for a run that went to its end; for one stopped by a signal it is
    {'signal': 'SIGINT', 'exit_code': 130, 'in_progress': check id or None, 'not_run': [ids]} (the check
    in progress is listed among those not run: its cells were not kept), plus 'earlier': {id: verdict} for checks
    not run whose results from an earlier run in the same folder the report still holds (:meth:`earlier`). While
    the run is in progress it holds the same with 'state': 'running' ('unfinished' once read back from a run that
    died without finishing): :mod:`harness.unfinished`.
    """

    run_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    interrupted: dict[str, Any] | None = None

    @property
    def verdict(self) -> Verdict:
        """Worst verdict of the checks that applied to the target (a check that could not apply, e.g. the source
        audit of a target with no fork source, is shown as SKIP with its reason but judges nothing). A check marked
        not applicable that holds anything worse than SKIP (a report edited to hide it) counts like any other."""
        return worst(c.verdict for c in self.checks if not (c.not_applicable and c.verdict == Verdict.SKIP))

    def earlier(self) -> dict[str, str]:
        """{check id: verdict} of the checks an interrupted run did not run but whose earlier results its folder's report
        still holds (``interrupted['earlier']``, set by :func:`harness.verify.run_checks`); {} otherwise."""
        e = (self.interrupted or {}).get("earlier")
        return e if isinstance(e, dict) else {}

    def verdict_label(self, check: CheckResult) -> str:
        """The check's verdict as reports show it: 'PASS (earlier run, not this one)' for a check of :meth:`earlier`,
        so an interrupted run never shows an earlier run's verdict as its own."""
        return f"{check.verdict.value} {EARLIER_MARK}" if check.id in self.earlier() else check.verdict.value

    @property
    def headline(self) -> str:
        """The run's verdict as reports print it: 'INTERRUPTED' for a run stopped by a signal or that died unfinished,
        'RUNNING' for one still going (:mod:`harness.unfinished`)."""
        from harness.unfinished import is_running
        return ("RUNNING" if is_running(self.interrupted) else "INTERRUPTED") if self.interrupted else self.verdict.value

    def exit_code(self, strict: bool = False) -> int:
        """130 / 143 (128 + signal) for an interrupted run; else 0 no FAIL and no ERROR; 1 a FAIL;
        2 an ERROR; --strict also fails (1) on PARTIAL."""
        if self.interrupted:  # never 0/1/2, whatever an edited report stores: a partial run is not judged
            code = self.interrupted.get("exit_code")
            return code if isinstance(code, int) and not isinstance(code, bool) and code > 2 else 130
        vs = {c.verdict for c in self.checks}
        if Verdict.ERROR in vs:
            return 2
        if Verdict.FAIL in vs:
            return 1
        if strict and Verdict.PARTIAL in vs:
            return 1
        return 0

    def to_dict(self) -> dict:
        return {
            "schema": "turbo-harness/run",
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "verdict": self.headline,
            "checks_verdict": self.verdict.value,
            "interrupted": self.interrupted,
            "meta": self.meta,
            "checks": [c.to_dict() for c in self.checks],
            "sections": self.sections,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        """Rebuild a run from its JSON form.

        Raises:
            NotAReport: not a turbo-harness run report at all, or one of another schema major version.
            ValueError: a run report whose fields have the wrong JSON types (damaged or edited).
        """
        if not isinstance(d, dict):
            raise NotAReport(f"it holds a JSON {_json_name(d)}, not a report object")
        ver = str(d.get("schema_version", ""))
        if "schema" not in d:
            raise NotAReport('it has no "schema": "turbo-harness/run" field')
        if d.get("schema") != "turbo-harness/run":
            raise NotAReport(f'its "schema" is {d.get("schema")!r}, not "turbo-harness/run"')
        if ver.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            by = d.get("meta", {}).get("harness_version") if isinstance(d.get("meta"), dict) else None
            raise NotAReport(f"its schema version is {ver or '(none)'}, this one reads {SCHEMA_VERSION.split('.')[0]}.x; "
                             f"read it with the turbo-harness that wrote it ({by or 'see its meta.harness_version'})")
        _check_shape(d)
        run = cls(run_id=d["run_id"], meta=d.get("meta", {}), sections=d.get("sections", {}),
                  interrupted=d.get("interrupted"))
        for cd in d.get("checks", []):
            cr = CheckResult(id=cd["id"], title=cd["title"], notes=cd.get("notes", []),
                             duration_s=cd.get("duration_s", 0.0), error=cd.get("error", ""),
                             not_applicable=cd.get("not_applicable", ""), tables=[Table.from_dict(t) for t in cd.get("tables", [])])
            for i, c in enumerate(cd.get("cells", [])):
                c = dict(c)
                c.pop("margin", None)
                _check_cell(c, f"cell {i + 1} of check {cr.id}")
                c["verdict"] = Verdict(c["verdict"])
                cr.cells.append(Cell(**c))
            run.checks.append(cr)
        return run


class NotAReport(ValueError):
    """A JSON file that is not a turbo-harness run report of this schema major version (the message says what it is)."""


def _json_name(v) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


_NUM = (int, float)
_RUN_FIELDS = {"run_id": (str,), "meta": (dict,), "sections": (dict,), "interrupted": (dict, type(None)),
               "checks": (list,)}
_CHECK_FIELDS = {"id": (str,), "title": (str,), "notes": (list,), "duration_s": _NUM, "error": (str,),
                 "not_applicable": (str,), "tables": (list,), "cells": (list,)}


def _types_text(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_shape(d: dict) -> None:
    """Raise ValueError naming the field when run.json's run or check level has the wrong JSON type (an edited or
    damaged report: meta a string, a check id a number, cells an object), before any reader trips over it."""
    if not isinstance(d, dict):
        raise ValueError(f"the file holds a JSON {type(d).__name__}, not an object")
    for k, types in _RUN_FIELDS.items():
        if k in d and not isinstance(d[k], types):
            raise ValueError(f"field '{k}' is {type(d[k]).__name__}, not {_types_text(types)}")
    if "sweep" in d.get("sections", {}):
        from harness.report.sweep_shape import check_sweep_section
        check_sweep_section(d["sections"]["sweep"])
    for i, cd in enumerate(d.get("checks", []), 1):
        if not isinstance(cd, dict):
            raise ValueError(f"check {i} is {type(cd).__name__}, not an object")
        for k, types in _CHECK_FIELDS.items():
            if k in cd and not isinstance(cd[k], types):
                raise ValueError(f"check {i}: field '{k}' is {type(cd[k]).__name__}, not {_types_text(types)}")
        if not all(isinstance(t, dict) for t in cd.get("tables", [])) or not all(
                isinstance(c, dict) for c in cd.get("cells", [])):
            raise ValueError(f"check {i}: every entry of 'tables' and 'cells' must be an object")
_CELL_FIELDS = {"check": (str,), "type": (str,), "path": (str,), "metric": (str,), "value": _NUM + (type(None),),
                "threshold": _NUM + (type(None),), "op": (str,), "caveat": (str,), "target": (bool,),
                "evidence": (list,), "details": (dict,), "known": (dict,)}


_REQUIRED = ("check", "type", "path", "metric", "value", "threshold", "verdict")
CELL_OPS = ("<=", ">=", "==", "<", ">")  # the comparisons cells are judged with (harness.report.rejudge.OPS)


def _check_cell(c: dict, where: str) -> None:
    """Raise ValueError naming the field when a stored cell's field is missing, has the wrong JSON type, or holds a
    verdict or op no check writes (an edited or damaged run.json): every reader relies on these types (numbers for
    value/threshold, an object for details), and a cell whose op is unknown could not be re-judged from its value
    (its stored PASS would be taken on trust)."""
    for k in _REQUIRED:
        if k not in c:
            raise ValueError(f"{where}: field '{k}' is missing")
    if not isinstance(c["verdict"], str) or c["verdict"] not in Verdict.__members__:
        raise ValueError(f"{where}: field 'verdict' is {c['verdict']!r}, not one of {', '.join(Verdict.__members__)}")
    if "op" in c and c["op"] not in CELL_OPS:
        raise ValueError(f"{where}: field 'op' is {c['op']!r}, not one of {', '.join(CELL_OPS)}")
    for k, types in _CELL_FIELDS.items():
        if k in c and not isinstance(c[k], types):
            raise ValueError(f"{where}: field '{k}' is {type(c[k]).__name__}, not "
                             f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")


def _cell_types(cell: Cell) -> set[str]:
    return {t for t in cell.type.split("/") if t.startswith("turbo")}


def _cell_backends(cell: Cell, known_backends: tuple[str, ...]) -> set[str]:
    import re
    head = cell.path.split("[", 1)[0]
    return {b for b in re.findall(r"([A-Za-z0-9_]+):", head) if b in known_backends}


def merge_previous(old: CheckResult, new: CheckResult, types: list[str], backends: list[str],
                   known_backends: tuple[str, ...]) -> list[str]:
    """Keep the cells of an earlier run of the same check that this run could not have produced.

    A new run of a check with fewer types or backends (``check PQ6 --type turbo2 --out <existing>``)
    replaces only the cells whose turbo types are all among ``types`` and whose backends are all among
    ``backends``; the other earlier cells are prepended to ``new.cells`` and a note says which were kept.
    ``known_backends``: the backend names a cell path may start with (the backend table,
    :func:`harness.fork.backends.names`). Returns the turbo types whose earlier cells were kept ([] when nothing
    was kept).
    """
    tset, bset = set(types), set(backends)
    kept = [x for x in old.cells if not (_cell_types(x) <= tset and _cell_backends(x, known_backends) <= bset)]
    if not kept:
        return []
    new.cells = kept + new.cells
    kept_types = sorted({t for x in kept for t in (_cell_types(x) or {x.type})} - tset) or sorted(tset)
    mixed = sorted({x.type for x in kept if _cell_types(x) & tset and not _cell_types(x) <= tset})
    kept_b = sorted({b for x in kept for b in _cell_backends(x, known_backends)} - bset)
    what = ", ".join(kept_types) + (f" (with the mixed pairs {', '.join(mixed)})" if mixed else "")
    new.notes.append(f"{len(kept)} cells of {what}{' on ' + ', '.join(kept_b) if kept_b else ''} are kept "
                     f"from the earlier run in this folder; this run replaced those of {', '.join(types)}"
                     f" on {', '.join(backends)}")
    return [what]
