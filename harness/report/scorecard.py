"""Several fork builds side by side (``turbo-harness scorecard RUN_DIR...``): which fork can be trusted, and for what.

Input: run folders (their ``run.json``: verify or check reports, one per fork build); nothing is measured again.
One :class:`Row` per run: the fork build (repository, commit, branch when known), its verdict, the layout it
uses per turbo type (values per block, bytes per block, whether a 2-byte rnorm field follows the norm), the
backends executed, one :class:`Score` per check x type (verdict and key value) and the one root finding a
maintainer should fix first (:func:`root_finding`). A cell that holds no measurement says why (check not run,
type missing from the build, unknown layout, type not asked for): never a blank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.report.findings import Finding, findings
from harness.report.model import Cell, Run, Verdict, worst
from harness.report.facts import fmt_num
from harness.turbo_types import TURBO_TYPES

TYPES = TURBO_TYPES
BITS = {"turbo2": 2, "turbo3": 3, "turbo4": 4}  # index bits per value of each type (spec; harness/reference/turbo.py)
# Which finding is the root a maintainer fixes first: the byte layout (nothing else can be read right without it),
# then the rotation, the stored norms and the codebook (each feeds every later stage), then what they cause
# (distortion, attention, agreement between paths) and last the model-level results.
ROOT_ORDER = ("PQ4", "PQ1", "PQ3", "PQ2", "PQ5", "PQ6", "COMPAT", "KVREAL", "MODEL", "SWEEP")
COLUMN_ORDER = ("PQ1", "PQ2", "PQ3", "PQ4", "PQ5", "PQ6", "COMPAT")  # the checks in the order `verify` runs them
_BAD = (Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR)


@dataclass
class Score:
    """One check x type of one fork: the verdict and its key value, or why nothing was measured.

    Attributes:
        verdict: 'PASS' ... 'ERROR', or 'NOT MEASURED'.
        text: the key value ('nmse_over_lloyd_max 1.95 (limit <= 1.05)') or the reason nothing was measured.
    """

    verdict: str
    text: str

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "text": self.text}


@dataclass
class Row:
    """One fork build as the scorecard shows it (see the module docstring)."""

    run_dir: str
    run_id: str
    repository: str
    commit: str
    branch: str
    verdict: str  # the run's verdict; with a known-findings gate its result, e.g. 'PASS (known-findings gate; 5 known findings)'
    backends: str
    layouts: dict[str, str] = field(default_factory=dict)
    scores: dict[tuple[str, str], Score] = field(default_factory=dict)
    root: str = ""

    @property
    def fork(self) -> str:
        """'owner/name @ commit (branch)' for a table's first column."""
        repo = re.sub(r"^(https?://|git@)(github\.com[/:])?", "", self.repository).removesuffix(".git")
        return f"{repo} @ {self.commit[:9]}" + (f" ({self.branch})" if self.branch not in ("", "unknown") else "")

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "run_id": self.run_id, "repository": self.repository, "commit": self.commit,
                "branch": self.branch, "verdict": self.verdict, "backends": self.backends, "layouts": self.layouts,
                "root_finding": self.root,
                "scores": {f"{c} {t}": s.to_dict() for (c, t), s in self.scores.items()}}


@dataclass
class Scorecard:
    """Rows (one per run) and the check x type columns every row fills."""

    rows: list[Row]
    columns: list[tuple[str, str]]

    def to_dict(self) -> dict:
        """scorecard.json: schema turbo-harness/scorecard 1.0."""
        return {"schema": "turbo-harness/scorecard", "schema_version": "1.0",
                "columns": [f"{c} {t}" for c, t in self.columns], "rows": [r.to_dict() for r in self.rows]}


def turbo_types(cell: Cell) -> set[str]:
    """The turbo types a cell is about ('q8_0/turbo4' -> {'turbo4'}); empty for shared ops ('all', 'f16/f16')."""
    return {t for t in re.split(r"[/ ]", cell.type) if t in TYPES}


def _same_commit(a, b) -> bool:
    return bool(a) and bool(b) and a != "unknown" and b != "unknown" and (str(a).startswith(str(b)) or str(b).startswith(str(a)))


def fork_identity(meta: dict) -> tuple[str, str, str]:
    """(repository, commit, branch) of a run's fork build. The build's own record first; the checkout's remote and
    branch only when the checkout is at the build's commit; else the reason they are unknown."""
    commit = str(meta.get("fork_commit") or "unknown")
    same = _same_commit(commit, meta.get("checkout_commit"))
    repo = meta.get("fork_remote") or (meta.get("checkout_remote") if same else None)
    branch = meta.get("fork_branch") or (meta.get("checkout_branch") if same else None)
    if not repo:
        where = meta.get("fork_dir") or meta.get("checkout_dir") or "?"
        repo = f"unknown (built from {where}, no git remote recorded)"
    return repo, commit, branch or "unknown"


def is_absence(x) -> bool:
    """True for a cell that records a type the build lacks: PQ4's measured ``type_present = 0`` (traits absent), or
    an older report's unmeasured cell whose caveat says the build has no type of that name."""
    if x.metric == "type_present":
        return x.value == 0
    return x.value is None and "no type named" in x.caveat


def missing_types(run: Run) -> dict[str, str]:
    """{type: reason} for turbo types the build does not have (PQ4's traits cell, or the recorded layout traits)."""
    out = {}
    for c in run.checks:
        for x in c.cells:
            if x.check == "PQ4" and x.path.endswith(":traits") and is_absence(x):
                out[x.type] = f"type missing from the build ({x.caveat})"
    traits = run.meta.get("layout_traits")
    if isinstance(traits, dict):
        for t in run.meta.get("types") or TYPES:
            if t in TYPES and t not in traits and t not in out:
                out[t] = "type missing from the build (no type traits)"
    return out


def layout_text(run: Run, t: str, missing: dict[str, str]) -> str:
    """'128 values / 68 bytes, 4.25 bits; norm + rnorm' (or the unknown-layout or missing reason) for one type.

    The header is what the block holds besides its indices: bytes - values x bits / 8 (2 bytes: the fp16 norm;
    4 bytes: norm and a 2-byte rnorm field)."""
    if t in missing:
        return missing[t]
    traits = (run.meta.get("layout_traits") or {}).get(t)
    desc = str((run.meta.get("layouts") or {}).get(t) or "")
    if not traits:
        m = re.search(r"(\d+) values (?:/|in) (\d+) bytes", desc)
        traits = [int(m.group(1)), int(m.group(2))] if m else None
    if not traits:
        return "layout not recorded in this run"
    blk, size = int(traits[0]), int(traits[1])
    head = size - blk * BITS[t] // 8
    fields = {2: "norm, no rnorm", 4: "norm + rnorm"}.get(head, f"{head}-byte header")
    unknown = "no known layout" in desc or any(n.startswith(f"{t}:") for n in run.meta.get("layout_notes") or [])
    return f"{blk} values / {size} bytes, {8 * size / blk:.3g} bits; {fields}" + ("; UNKNOWN to the reference" if unknown else "")


def _key_value(cells: list[Cell]) -> str:
    bad = [x for x in cells if x.verdict in _BAD]
    pool = bad or [x for x in cells if x.verdict == Verdict.PASS] or cells
    measured = [x for x in pool if isinstance(x.value, (int, float)) and x.margin is not None]
    x = min(measured, key=lambda c: c.margin) if measured else pool[0]
    if x.value is None or x.verdict == Verdict.SKIP:
        return x.caveat or f"{x.metric}: not measured"
    lim = f" (limit {x.op} {fmt_num(x.threshold)})" if x.threshold is not None else ""
    more = f" on {x.path}" if len(cells) > 1 else ""
    return f"{x.metric} {fmt_num(x.value)}{lim}{more}" + (f": {x.caveat}" if x.caveat and x.verdict in _BAD else "")


def score(run: Run, check: str, t: str, missing: dict[str, str]) -> Score:
    """The verdict and key value of one check on one type in one run, or the reason nothing was measured."""
    cr = next((c for c in run.checks if c.id == check), None)
    if cr is None:
        if run.interrupted and check in (run.interrupted.get("not_run") or []):
            return Score("NOT MEASURED", f"not run: the run was interrupted by {run.interrupted.get('signal')}")
        return Score("NOT MEASURED", f"{check} was not run in this report")
    if cr.error:
        return Score("ERROR", f"the harness could not measure: {cr.error}")
    own = [x for x in cr.cells if t in turbo_types(x)]
    if t in missing:  # a mixed pair (turbo3/turbo2) of a type the build lacks failed on its other type: not t's cell
        own = [x for x in own if turbo_types(x) == {t}]
    shared = [x for x in cr.cells if not turbo_types(x)]
    if not own and t in missing:
        return Score("NOT MEASURED", missing[t])
    if not own and t not in (run.meta.get("types") or TYPES):
        return Score("NOT MEASURED", f"{t} was not asked for (--type {','.join(run.meta.get('types') or [])})")
    cells = own or shared
    if not cells:
        lay = next((n for n in run.meta.get("layout_notes") or [] if n.startswith(f"{t}:")), None)
        return Score("NOT MEASURED", lay or f"{check} measured no cell of {t} ({cr.verdict.value} on the others)")
    v = worst(x.verdict for x in cells)
    if v in _BAD:
        return Score(v.value, _key_value([x for x in cells if x.verdict == v]))
    passed = [x for x in cells if x.verdict == Verdict.PASS]
    skipped = [x for x in cells if x.verdict == Verdict.SKIP]
    if not passed or (any(x.target for x in skipped) and not any(x.target for x in passed)):
        # nothing measured, or nothing on the target path (a fallback's PASS does not stand for it): the first reason
        first = next((x for x in skipped if x.caveat and (x.target or not passed)), None)
        more = f"; {len(passed)} cells PASS on other paths" if passed else ""
        return Score("SKIP", (first.caveat if first else "skipped (no reason recorded)") + more)
    extra = f"; {len(skipped)} cells SKIP ({skipped[0].caveat or 'no reason recorded'})" if skipped else ""
    return Score("PASS", _key_value(passed) + extra)  # SKIP cells beside measured PASS ones do not hide them


def root_finding(run: Run) -> str:
    """The one finding a maintainer fixes first: the fork's findings (FAIL, PARTIAL) by :data:`ROOT_ORDER` (layout
    before rotation before norms before codebook ... before model results: an upstream PARTIAL codebook is the root of
    a downstream FAIL in distortion), FAIL before PARTIAL within a check; a type missing from the build only after
    the other findings; an ERROR (the harness could not measure) only when the fork has no finding; 'none: ...' when every judged cell passed. The finding's own plain line (harness.report.findings)."""
    every = findings(run)
    fs = [f for f in every if f.label not in ("XFAIL",)]
    if not fs and any(f.label == "XFAIL" for f in every):
        # a run judged with --known whose every finding is expected: the fork still has them (the run is FAIL or
        # PARTIAL), so the root is the first of them, marked as known, never 'none'
        fs = [f for f in every if f.label == "XFAIL"]  # its line starts with XFAIL and says 'Expected (...)'
    if not fs:
        return f"none: {run.headline}, every judged cell passed" if run.verdict == Verdict.PASS else f"none ({run.headline})"

    def key(f: Finding):  # the fork's findings (FAIL, PARTIAL) upstream first; a type the build lacks (often by
        # design on an experiment branch) after them; the harness's ERRORs last
        grade = {"FAIL": 0, "GROWN": 0, "PARTIAL": 1, "XFAIL": 1}.get(f.label, 2)
        absent = bool(f.cells) and all(is_absence(x) for x in f.cells)
        order = ROOT_ORDER.index(f.check) if f.check in ROOT_ORDER else len(ROOT_ORDER)
        return grade == 2, absent, order, grade
    f = min(fs, key=key)
    line = f.line()
    line = line.split(" Means: ")[0]  # the finding itself; its meaning is in the run's own report
    return " ".join(line.split())


def make_row(run: Run, run_dir: str) -> Row:
    """The scorecard row of one run (columns filled by :func:`build`)."""
    repo, commit, branch = fork_identity(run.meta)
    missing = missing_types(run)
    from harness.report.findings import gate_summary
    from harness.report.facts import plain
    # a run gated with --known shows the gate's result as its command exited, with its findings counted
    return Row(run_dir=run_dir, run_id=run.run_id, repository=repo, commit=commit, branch=branch, verdict=gate_summary(run),
               backends=plain(run.meta.get("backends_run")) if run.meta.get("backends_run") else "none recorded",
               layouts={t: layout_text(run, t, missing) for t in TYPES}, root=root_finding(run))


def build(runs: list[tuple[Run, str]]) -> Scorecard:
    """The scorecard of ``runs`` ((Run, folder) pairs): columns are every check any run holds (in :data:`ROOT_ORDER`
    order, others after) x the three turbo types; every row fills every column."""
    seen = list(dict.fromkeys(c.id for r, _ in runs for c in r.checks))
    ids = [i for i in COLUMN_ORDER if i in seen] + [i for i in seen if i not in COLUMN_ORDER]
    columns = [(c, t) for c in ids for t in TYPES]
    rows = []
    for run, d in runs:
        row = make_row(run, d)
        missing = missing_types(run)
        row.scores = {(c, t): score(run, c, t, missing) for c, t in columns}
        rows.append(row)
    return Scorecard(rows, columns)


def load_scorecard(run_dirs: list[Path], log=None) -> Scorecard:
    """Read the runs (re-judged from their evidence: ``log(line)`` gets the line for a run whose stored verdicts
    disagree with its numbers) and build the scorecard. Raises HarnessError (one line) for a folder without a run
    report, or for a sweep report (check SWEEP or XBACKEND: its cells are K/V pairs of one build, not the checks x
    turbo types a scorecard row holds)."""
    from harness.errors import HarnessError
    from harness.pipeline import SWEEP_IDS, _ids_in, load_run
    if not run_dirs:
        raise HarnessError("give one or more run folders (verify reports), e.g. reports/samples/cpu-verify")
    for d in run_dirs:
        sweeps = [i for i in _ids_in(Path(d)) if i in SWEEP_IDS]
        if sweeps:
            what = "a cross-backend sweep" if "XBACKEND" in sweeps else "a sweep"
            raise HarnessError(f"{d} is {what} report (its run.json holds check {sweeps[0]}), and a scorecard needs verify reports (one "
                               f"per fork build, from `turbo-harness verify --out DIR`); compare sweeps with "
                               f"`turbo-harness sweep-compare` or `turbo-harness diff`")
    return build([(load_run(Path(d), log=None if log is None else (lambda line, d=d: log(f"{d}: {line}"))), str(d))
                  for d in run_dirs])
