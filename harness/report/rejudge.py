"""Re-judging a stored run from its evidence: a report travels between CI jobs, so its verdict strings are not
taken on trust (issue 22, group 1).

Every judged cell carries its measured ``value``, the ``threshold`` and ``op`` it was judged against and whether
its path is the production target (``target``): the rules in force when it ran. :func:`rejudge` recomputes
what those numbers allow and corrects a verdict that claims better than its value shows:

* a value outside its threshold (``value op threshold`` false, NaN included) cannot be PASS or SKIP: it becomes
  the verdict a breach gets under the spec's target-vs-fallback rule (FAIL on the target path, PARTIAL on a
  fallback path, :meth:`harness.checks.common.Context.cell`), or the breach verdict the cell records;
* a PASS with no measured value (no check writes one; a crash cell's FAIL edited to PASS looks so) is SKIP:
  nothing measured is never PASS;
* a verdict worse than its numbers (PARTIAL, FAIL, ERROR) is kept: checks judge several criteria, the stored
  value is the headline one, and a worse verdict never hides a problem; a FAIL/PARTIAL judged by a number it no
  longer holds is kept too, and its note and the re-judge line say so (:func:`not_measured`).

A check whose rule tolerates a value a little past its threshold (a measurement resolution, a standard error)
records the limit it really judged against in ``cell.details['rule'] = {'limit': x, 'breach': 'PARTIAL'}``
(``breach``: 'FAIL', 'PARTIAL' or 'none' for a cell listed, not judged). The exit code then follows the
re-judged verdicts (:meth:`harness.report.model.Run.exit_code`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from harness.report.model import Cell, Run, Verdict

OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}

# the breach verdict of cells whose check rules it otherwise, for reports written before cells recorded their rule
# (new cells carry it in details['rule']): (check, metric, type) -> 'none' (listed, not judged) or a verdict
LEGACY_RULES = {("SWEEP", "kld_growth_with_depth", "f16/f16"): "none",  # the depth sweep's noise floor (checks/depth.py)
                ("SWEEP", "pairs_judged", "all"): "SKIP"}  # 'nothing judged' is a SKIP, never a FAIL (checks/sweeps.py)


@dataclass
class Rejudged:
    """One cell whose stored verdict its own numbers do not allow.

    Attributes: check: check id; cell: the cell (its verdict already replaced); stored: the verdict it carried;
    kept: the verdict was kept as stored for want of a value (its note says so).
    """

    check: str
    cell: Cell
    stored: Verdict
    kept: bool = False  # a FAIL/PARTIAL with no value to check it by, kept as stored (:func:`rejudge`)


def allowed(cell: Cell, check: str = "") -> Verdict | None:
    """The best verdict the cell's own numbers allow, or None when they do not limit it.

    None: no value or no threshold (nothing judged by number), an unknown op, a listed cell, or the value is
    inside its limit. Else the breach verdict: ``details['rule']['breach']`` when recorded, else FAIL on the
    target path and PARTIAL on a fallback path.
    """
    rule = cell.details.get("rule") if isinstance(cell.details, dict) else None
    rule = rule if isinstance(rule, dict) else {}
    limit = rule.get("limit", cell.threshold)
    breach = rule.get("breach") or LEGACY_RULES.get((str(check or cell.check), str(cell.metric), str(cell.type)))
    if breach == "none":
        return None
    if cell.value is None or limit is None or not isinstance(cell.op, str) or cell.op not in OPS:
        return None
    try:
        v, lim = float(cell.value), float(limit)
    except (TypeError, ValueError):
        return None
    if not math.isnan(v) and OPS[cell.op](v, lim):
        return None
    breach = str(breach or ("FAIL" if cell.target else "PARTIAL")).upper()
    return Verdict(breach) if breach in Verdict.__members__ else Verdict.FAIL


def not_measured(cell: Cell) -> bool:
    """A FAIL or PARTIAL cell judged against a number (it has a threshold) that holds no value (one removed from
    run.json): its stored verdict is kept, never made better, and a known finding cannot be checked on it
    (:func:`harness.known.apply_known`). A crash cell is judged by no number (no threshold): measured."""
    return cell.verdict in (Verdict.PARTIAL, Verdict.FAIL) and cell.value is None and cell.threshold is not None


def rejudge(run: Run) -> list[Rejudged]:
    """Recompute each judged cell of ``run`` from its value, threshold, op and recorded rule, in place.

    A cell claiming PASS or SKIP whose value breaches its limit gets the breach verdict and a caveat that says
    so ('re-judged: stored PASS, value 1.945 not <= 1.05'). Returns the cells changed ([] when every stored
    verdict agrees with its numbers).
    """
    out = []
    for cr in run.checks:
        for c in cr.cells:
            if c.verdict == Verdict.PASS and c.value is None:  # no check writes one: nothing measured is never PASS
                out.append(Rejudged(cr.id, c, c.verdict))
                note = "re-judged: stored PASS, but the cell holds no measured value"
                c.verdict, c.caveat = Verdict.SKIP, f"{note}; {c.caveat}" if c.caveat else note
                continue
            if not_measured(c):  # judged by a number it does not hold: kept (never made better), and said so
                out.append(Rejudged(cr.id, c, c.verdict, kept=True))
                note = f"no value stored: the stored {c.verdict.value} is kept (never made better without its number)"
                c.caveat = c.caveat if c.caveat.startswith(note) else f"{note}; {c.caveat}" if c.caveat else note
                continue
            want = allowed(c, cr.id)
            if want is None or c.verdict not in (Verdict.PASS, Verdict.SKIP) or want.rank <= c.verdict.rank:
                continue
            out.append(Rejudged(cr.id, c, c.verdict))
            lim = (c.details.get("rule") or {}).get("limit", c.threshold) if isinstance(c.details, dict) else c.threshold
            note = f"re-judged: stored {c.verdict.value}, but value {float(c.value):.6g} is not {c.op} {float(lim):.6g}"
            c.verdict = want
            c.caveat = f"{note}; {c.caveat}" if c.caveat else note
    return out


def rejudge_line(out: list[Rejudged]) -> str | None:
    """The one line ``report`` prints when stored verdicts disagree with their numbers, or FAIL/PARTIAL cells hold no
    number to check them by (None when neither)."""
    changed, kept = [r for r in out if not r.kept], [r for r in out if r.kept]
    parts = []
    if changed:
        first = changed[0]
        parts.append(f"cell verdicts were edited or rules changed: re-judged {len(changed)} cell"
                     f"{'s' if len(changed) != 1 else ''} from their values (e.g. {first.check} {first.cell.type} "
                     f"{first.cell.path}: stored {first.stored.value}, now {first.cell.verdict.value})")
    if kept:
        k = kept[0]
        parts.append(f"{len(kept)} FAIL/PARTIAL cell{'s' if len(kept) != 1 else ''} hold no value: kept as stored, "
                     f"never made better (e.g. {k.check} {k.cell.type} {k.cell.path}: {k.stored.value})")
    return "; ".join(parts) or None
