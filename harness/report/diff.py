"""What changed between two runs (``turbo-harness diff BASE_RUN NEW_RUN``): every cell matched, every change named.

Input: two run folders (their ``run.json``: verify, check or sweep reports alike, schema turbo-harness/run).
Nothing is measured again. A cell is matched by (check, type, path, metric, case); each match, or its absence,
is one of:

- **appeared**: a cell only the new run has (a *new finding* when it is not PASS/SKIP);
- **disappeared**: a cell only the base run has (a whole check missing is one entry: coverage lost);
- **worse** / **better**: the verdict changed (order PASS < SKIP < PARTIAL < FAIL < ERROR), or the value moved
  beyond its noise in the direction its rule calls worse (up for a ``<=`` limit, down for ``>=``);
- **moved**: the value moved beyond its noise on a cell whose rule names no direction (no limit);
- **rule changed**: the two runs judged the cell against other limits (then its verdict is not compared).

Noise of a value (``checks/diff.toml``): its own standard error where the cell carries one
(:data:`SE_KEYS`; combined as sqrt(se_base^2 + se_new^2), times ``se_factor``), else ``rel_tolerance`` of its
rule's limit. Runs judged with other rules or sizes (``meta['rules']``, a sweep's pinned sizes, model, corpus,
types) are named in :attr:`Diff.notes` at the top of every output: never a silent comparison.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness.report.diff_sides import SIZE_KEYS, comparability, side  # noqa: F401  (re-exported)
from harness.report.model import Cell, Run, Verdict

DIFF_RULES = Path(__file__).resolve().parents[2] / "checks" / "diff.toml"

# The detail that holds a cell's own standard error, by metric (prefix), as harness/checks/sweeps.py writes them:
# KLD difference, speed ratio and KLD growth in the value's units; the PPL change vs q8_0 (value = expm1(d_ln)) has
# its se on the ln scale, converted by :func:`cell_se`.
SE_KEYS = (("ppl_vs_q8_0", "d_ln_se"), ("kld_vs_", "d_kld_se"), ("prefill_ratio", "ratio_se"),
           ("decode_ratio", "ratio_se"), ("kld_growth", "growth_se"), ("", "se"))
KINDS = ("worse", "appeared", "disappeared", "better", "moved", "rule changed")
WORSE = ("worse", "disappeared")  # --fail-on worse also fails on an appeared cell that is a finding (see Change.bad)


def cell_key(c: Cell) -> tuple:
    """(check, type, path, metric, case, table): what makes a cell the same cell in two runs (``table``: the source
    table an AUDIT cell judges, by name: line numbers move between commits, names do not)."""
    d = c.details if isinstance(c.details, dict) else {}
    name = d.get("table") if isinstance(d.get("table"), str) else ""  # PQ2 keeps its centroid values there: data
    return (c.check, c.type, c.path, c.metric, str(d.get("case", "")), name)


def keyed(cells: list[Cell]) -> dict[tuple, Cell]:
    """{key: cell} for one check's cells: :func:`cell_key`, plus the cell's ordinal among cells of an equal key
    (two definitions of one table under preprocessor conditions, repeated crash cells), so that no cell hides
    behind another of its key: the n-th of a key is matched with the n-th of that key in the other run."""
    out: dict[tuple, Cell] = {}
    seen: dict[tuple, int] = {}
    for c in cells:
        k = cell_key(c)
        n = seen[k] = seen.get(k, -1) + 1
        out[k + ((n,) if n else ())] = c
    return out


def cell_se(c: Cell) -> float | None:
    """The cell's own standard error of ``value`` (same units), or None when it carries none (:data:`SE_KEYS`)."""
    for prefix, key in SE_KEYS:
        if c.metric.startswith(prefix) and isinstance(c.details.get(key), (int, float)):
            v = float(c.details[key])
            if key == "d_ln_se" and isinstance(c.value, (int, float)):
                v *= 1.0 + float(c.value)  # value = expm1(d_ln): se of exp(d) - 1 is exp(d) x se(d) (delta method)
            return v if math.isfinite(v) else None
    return None


@dataclass
class Change:
    """One difference between the runs.

    Attributes:
        kind: one of :data:`KINDS`.
        check, type, path, metric: the cell ('*' path and metric for a whole check).
        base, new: the cell on each side (None where absent).
        noise: the movement allowed before a value counts as moved (same units as the value), None if not compared.
        noise_from: 'se' (the runs' own standard errors) or 'tolerance' (the rule's, checks/diff.toml).
        why: one plain line.
    """

    kind: str
    check: str
    type: str
    path: str
    metric: str
    base: Cell | None = None
    new: Cell | None = None
    noise: float | None = None
    noise_from: str = ""
    why: str = ""

    @property
    def bad(self) -> bool:
        """True for what ``--fail-on worse`` fails on: worse, disappeared, or an appeared cell that is a finding
        (or a new check that could not measure)."""
        if self.kind in WORSE or self.worse_rule_changed:
            return True
        if self.kind == "appeared" and self.metric == "check error":
            return True
        return self.kind == "appeared" and self.new is not None and self.new.verdict in (
            Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR)

    @property
    def worse_rule_changed(self) -> bool:
        """A cell judged against another limit whose verdict got worse (PASS -> FAIL): listed as RULE CHANGED, and
        still a failure for ``--fail-on worse`` (the new run found a problem whatever limit found it)."""
        a, b = self.base, self.new
        return (self.kind == "rule changed" and a is not None and b is not None and a.verdict != b.verdict
                and verdict_change(a.verdict, b.verdict) == "worse")

    @property
    def label(self) -> str:
        """'WORSE', 'NEW FINDING', 'APPEARED', 'DISAPPEARED', 'BETTER', 'MOVED' or 'RULE CHANGED'."""
        if self.kind == "appeared" and self.bad:
            return "NEW FINDING"
        return self.kind.upper()

    @property
    def delta(self) -> float | None:
        """new value - base value, or None."""
        a, b = (self.base.value if self.base else None), (self.new.value if self.new else None)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return float(b) - float(a)
        return None

    def to_dict(self) -> dict:
        """The change as diff.json stores it (both cells whole)."""
        return {"kind": self.kind, "label": self.label, "bad": self.bad, "check": self.check, "type": self.type,
                "path": self.path, "metric": self.metric, "delta": self.delta, "noise": self.noise,
                "noise_from": self.noise_from, "why": self.why,
                "base": self.base.to_dict() if self.base else None, "new": self.new.to_dict() if self.new else None}


@dataclass
class Diff:
    """Two runs compared: their identities, the notes on comparability, every change and what stayed."""

    base: Run
    new: Run
    base_dir: str
    new_dir: str
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unchanged: int = 0
    comparable: bool = True  # False when rules or sizes differ (said in notes)

    def counts(self) -> dict[str, int]:
        """{label: number of changes}, in :data:`KINDS` order ('NEW FINDING' apart from 'APPEARED')."""
        out: dict[str, int] = {}
        for c in self.changes:
            out[c.label] = out.get(c.label, 0) + 1
        return out

    def exit_code(self, fail_on: str) -> int:
        """0 or 1 for ``--fail-on``: 'worse' fails on any :attr:`Change.bad`; 'changed' on any change or a note
        that the runs used other rules or sizes; 'never' is always 0."""
        if fail_on == "worse":
            return int(any(c.bad for c in self.changes))
        if fail_on == "changed":
            return int(bool(self.changes) or not self.comparable)
        return 0

    def verdict_line(self) -> str:
        """'3 changes: 1 worse, 1 better, 1 new finding; 101 cells unchanged' (and the comparability warning)."""
        cs = self.counts()
        if not cs:
            text = f"no change: {self.unchanged} cells matched within their noise"
        else:
            order = ["WORSE", "NEW FINDING", "DISAPPEARED", "APPEARED", "BETTER", "MOVED", "RULE CHANGED"]
            text = (f"{len(self.changes)} change{'s' if len(self.changes) != 1 else ''}: "
                    + ", ".join(f"{cs[k]} {k.lower()}{'s' if k == 'NEW FINDING' and cs[k] > 1 else ''}"
                                for k in order if k in cs)
                    + f"; {self.unchanged} cells unchanged within their noise")
        if not self.comparable:
            text = "NOT LIKE FOR LIKE (other rules or sizes, see the notes); " + text
        return text

    def to_dict(self) -> dict:
        """diff.json: schema turbo-harness/diff 1.0."""
        return {"schema": "turbo-harness/diff", "schema_version": "1.0", "verdict_line": self.verdict_line(),
                "comparable": self.comparable, "notes": self.notes, "counts": self.counts(),
                "unchanged": self.unchanged, "base": side(self.base, self.base_dir), "new": side(self.new, self.new_dir),
                "changes": [c.to_dict() for c in self.changes]}


def load_diff_rules(path: Path | None = None) -> dict:
    """{'se_factor', 'rel_tolerance', 'abs_floor'} from checks/diff.toml (each entry ``{ value, reason }``, as in
    thresholds.toml; read here with tomllib alone, so that `diff` does not load the checks' SciPy).

    Raises:
        HarnessError: the file is missing or malformed, or an entry lacks a number or a reason (one line).
    """
    from harness.errors import HarnessError
    p = Path(path or DIFF_RULES)
    try:
        raw = tomllib.loads(p.read_text()).get("noise", {})
    except OSError:
        raise HarnessError(f"diff rules file {p} not found: restore checks/diff.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"{p}: {e}") from None
    out = {}
    for k in ("se_factor", "rel_tolerance", "abs_floor"):
        v = raw.get(k)
        if not isinstance(v, dict) or not isinstance(v.get("value"), (int, float)) or not v.get("reason"):
            raise HarnessError(f"{p}: [noise] {k} needs a number value and a one-line reason")
        out[k] = float(v["value"])
    return out


def _direction(c: Cell, delta: float) -> str:
    """'worse', 'better' or 'moved' for a value change of ``delta`` under the cell's rule."""
    if c.threshold is None or delta == 0:
        return "moved"
    if c.op == "<=":
        return "worse" if delta > 0 else "better"
    if c.op == ">=":
        return "worse" if delta < 0 else "better"
    return "moved"


def _noise(a: Cell, b: Cell, rules: dict) -> tuple[float, str]:
    sa, sb = cell_se(a), cell_se(b)
    if sa is not None or sb is not None:
        return float(rules["se_factor"]) * math.hypot(sa or 0.0, sb or 0.0), "se"
    lim = b.threshold if isinstance(b.threshold, (int, float)) else None
    if lim is None:
        ref = max(abs(float(a.value)), abs(float(b.value)))
        return max(float(rules["rel_tolerance"]) * ref, float(rules["abs_floor"])), "tolerance"
    return max(float(rules["rel_tolerance"]) * abs(float(lim)), float(rules["abs_floor"])), "tolerance"


def _fmt(v) -> str:
    from harness.report.facts import fmt_num
    return fmt_num(v)


def verdict_change(a: Verdict, b: Verdict) -> str:
    """'worse' or 'better' for a verdict going from ``a`` to ``b``: a cell no longer measured (SKIP) or no longer
    measurable (ERROR) is worse whatever it was, never better (a FAIL that turns SKIP hides a finding); a cell
    measured again is better only when it passes; else by the order PASS < PARTIAL < FAIL."""
    if b in (Verdict.SKIP, Verdict.ERROR):
        return "worse"
    if a in (Verdict.SKIP, Verdict.ERROR):
        return "better" if b == Verdict.PASS else "worse"
    return "worse" if b.rank > a.rank else "better"


def compare_cells(a: Cell, b: Cell, rules: dict) -> Change | None:
    """The change between two matched cells, or None when they agree (same verdict, value within its noise)."""
    mk = dict(check=b.check, type=b.type, path=b.path, metric=b.metric, base=a, new=b)
    if (a.threshold, a.op) != (b.threshold, b.op):
        return Change("rule changed", **mk, why=f"judged against {a.op} {_fmt(a.threshold)} in BASE, {b.op} "
                                                f"{_fmt(b.threshold)} in NEW: verdicts {a.verdict.value} -> {b.verdict.value} "
                                                f"are not comparable")
    if a.verdict != b.verdict:
        kind = verdict_change(a.verdict, b.verdict)
        why = f"verdict {a.verdict.value} -> {b.verdict.value}; {b.metric} {_fmt(a.value)} -> {_fmt(b.value)}"
        return Change(kind, **mk, why=why + (f" ({b.caveat})" if b.caveat and kind == "worse" else ""))
    if not (isinstance(a.value, (int, float)) and isinstance(b.value, (int, float))):
        if (a.value is None) != (b.value is None):
            return Change("moved", **mk, why=f"{b.metric} {_fmt(a.value)} -> {_fmt(b.value)}")
        return None
    if any(isinstance(v, float) and not math.isfinite(v) for v in (a.value, b.value)):
        same = str(a.value) == str(b.value)
        return None if same else Change("moved", **mk, why=f"{b.metric} {_fmt(a.value)} -> {_fmt(b.value)}")
    delta = float(b.value) - float(a.value)
    noise, src = _noise(a, b, rules)
    if abs(delta) <= noise:
        return None
    kind = _direction(b, delta)
    lim = f" (limit {b.op} {_fmt(b.threshold)})" if b.threshold is not None else ""
    how = "combined standard errors" if src == "se" else "the rule's tolerance (checks/diff.toml)"
    return Change(kind, **mk, noise=noise, noise_from=src,
                  why=f"{b.metric} {_fmt(a.value)} -> {_fmt(b.value)}{lim}: moved {_fmt(delta)}, beyond "
                      f"{_fmt(noise)} ({how}); verdict {b.verdict.value} both times")


def diff_runs(base: Run, new: Run, base_dir: str = "", new_dir: str = "", rules: dict | None = None) -> Diff:
    """Compare two runs cell by cell (see the module docstring).

    Args:
        base, new: the accepted run and the run under test.
        base_dir, new_dir: their folders, for the report.
        rules: checks/diff.toml's [noise] (default: :func:`load_diff_rules`).
    Returns:
        A :class:`Diff`; changes ordered worse first (worse, new findings, disappeared), then the rest, each in
        check order of the new run.
    """
    rules = rules or load_diff_rules()
    d = Diff(base, new, base_dir, new_dir)
    d.notes, d.comparable = comparability(base, new)
    bchecks = {c.id: c for c in base.checks}
    nchecks = {c.id: c for c in new.checks}
    for cid, bc in bchecks.items():  # a whole check gone is one entry, not one per cell
        if cid not in nchecks:
            d.changes.append(Change("disappeared", cid, "all", "*", "*", why=(
                f"check {cid} ({bc.title}) is not in NEW: its {len(bc.cells)} cells ({bc.verdict.value} in BASE) "
                f"were not measured")))
    for cid, nc in nchecks.items():
        bc = bchecks.get(cid)
        if bc is None:  # a new check: its findings one entry each, else one entry for the check
            bad = [x for x in nc.cells if x.verdict in (Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR)]
            d.changes += [Change("appeared", x.check, x.type, x.path, x.metric, new=x,
                                 why=f"check {cid} is new in NEW; {x.verdict.value}: {x.metric} = {_fmt(x.value)}"
                                     + (f" ({x.caveat})" if x.caveat else "")) for x in bad]
            if nc.error:
                d.changes.append(Change("appeared", cid, "all", "*", "check error", why=f"check {cid} is new in NEW "
                                        f"and could not measure: {nc.error}"))
            if not bad and not nc.error:
                d.changes.append(Change("appeared", cid, "all", "*", "*", why=f"check {cid} ({nc.title}) is new in NEW: "
                                        f"{nc.verdict.value}, {len(nc.cells)} cells"))
            continue
        if bc.error != nc.error:
            kind = "worse" if nc.error and not bc.error else ("better" if bc.error and not nc.error else "moved")
            d.changes.append(Change(kind, cid, "all", "*", "check error",
                                    why=f"check error: {bc.error or 'none'} -> {nc.error or 'none'}"))
        bcells, ncells = keyed(bc.cells), keyed(nc.cells)
        for k, x in ncells.items():
            a = bcells.get(k)
            if a is None:
                d.changes.append(Change("appeared", x.check, x.type, x.path, x.metric, new=x,
                                        why=f"{x.verdict.value}: {x.metric} = {_fmt(x.value)}"
                                            + (f" ({x.caveat})" if x.caveat and x.verdict != Verdict.PASS else "")))
                continue
            ch = compare_cells(a, x, rules)
            if ch is None:
                d.unchanged += 1
            else:
                d.changes.append(ch)
        for k, a in bcells.items():
            if k not in ncells:
                d.changes.append(Change("disappeared", a.check, a.type, a.path, a.metric, base=a,
                                        why=f"not measured in NEW ({a.verdict.value} in BASE: {a.metric} = {_fmt(a.value)})"))
    rank = {"worse": 0, "appeared": 1, "disappeared": 2, "rule changed": 3, "better": 4, "moved": 5}
    d.changes.sort(key=lambda c: (0 if c.bad else 1, rank[c.kind]))
    return d
