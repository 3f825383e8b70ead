"""Root causes: one fault that several findings see, said once at the top of a report (issue 22, group 5).

Each detector reads only what the run's cells and sections hold (never the fork's source):

* ``zero_indices``: a quantiser wrote no indices (every stored index 0): PQ1 records it on its cell
  (``details['cause']``); every other finding of that type follows from it.
* ``missing_type``: the build has no such type (PQ4 records it); every finding of that type follows from it.
* ``missing_trait``: the build's type traits lack a function (the probe's 'type has no <fn> in its traits').
* ``k_side``: the quality loss is on the K side: from the sweep's PPL rows (turbo on K only vs on V only, each
  against q8_0) and from KVREAL's per-type note of which side carries the attention-output error.

The sentences live in ``checks/meanings.toml`` ``[ROOT]`` (format fields in braces).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.report.model import Cell, Run, Verdict

_BAD = (Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR)
_TRAIT = re.compile(r"has no (\w+) in its traits")
# KVREAL's loss note (harness/checks/kvreal.py loss_notes): 'turbo3: K carries 91% of ...; worst layers K11 (1.16), K5 ...'
_KV_NOTE = re.compile(r"^(turbo\d): (K|V) carries (\d+)% of the summed squared attention-output error; worst layers ([^;]*)")
K_SHARE_MIN = 75      # % of the attention-output error on one side before it is called that side's loss
PPL_RATIO_MIN = 2.0   # K-only PPL loss at least this many times the V-only one
QUALITY = ("ppl", "kld", "nmse", "decode_prefix")  # metrics of quality loss (a K-side loss explains these)


@dataclass
class RootCause:
    """One cause several findings share.

    Attributes:
        key: 'zero_indices', 'missing_type', 'missing_trait' or 'k_side'.
        text: the sentence shown at the top (from meanings.toml [ROOT]).
        types: the turbo types it concerns.
        checks: the checks whose findings it explains (empty: every check).
        k_side: for 'k_side': only pairs with the type on K (and KVREAL's K rows) are explained.
    """

    key: str
    text: str
    types: set[str] = field(default_factory=set)
    checks: set[str] = field(default_factory=set)
    k_side: bool = False

    def covers(self, check: str, cell: Cell) -> bool:
        """Whether a non-PASS cell of ``check`` follows from this cause."""
        if self.checks and check not in self.checks:
            return False
        parts = cell.type.split("/")
        if self.k_side:  # quality findings with the type on K (speed is another matter)
            return parts[0] in self.types and "[V " not in cell.path and any(q in cell.metric for q in QUALITY)
        return bool(set(parts) & self.types)


def _sentence(key: str, **kw) -> str:
    from harness.report.findings import load_meanings
    tmpl = load_meanings().get("ROOT", {}).get(key, "")
    try:
        return tmpl.format(**kw)
    except (KeyError, IndexError):
        return tmpl


def _join(xs) -> str:
    xs = sorted(set(xs))
    return ", ".join(xs[:-1]) + f" and {xs[-1]}" if len(xs) > 1 else "".join(xs)


def _bad_cells(run: Run):
    for c in run.checks:
        for x in c.cells:
            if x.verdict in _BAD:
                yield c.id, x


def _by_cause(run: Run, cause: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for _, x in _bad_cells(run):
        if isinstance(x.details, dict) and x.details.get("cause") == cause:
            out.setdefault(x.type, set()).add(x.path)
    return out


def _k_side(run: Run) -> list[RootCause]:
    """The K-side loss, per turbo type, from the sweep's rows and KVREAL's notes (both when both ran)."""
    said: dict[str, list[str]] = {}
    rows = {r.get("pair"): r for r in (run.sections.get("sweep") or {}).get("rows", []) if isinstance(r, dict)}
    for pair, r in rows.items():
        m = re.fullmatch(r"(turbo\d)/q8_0", str(pair))
        v_row = rows.get(f"q8_0/{m.group(1)}") if m else None
        if not m or not v_row:
            continue
        k, v = r.get("ppl_vs_q8_pct"), v_row.get("ppl_vs_q8_pct")
        if isinstance(k, (int, float)) and isinstance(v, (int, float)) and k > 1.0 and k >= PPL_RATIO_MIN * max(v, 0.0):
            said.setdefault(m.group(1), []).append(
                f"{m.group(1)} on K only costs {k:+.1f}% PPL against q8_0, on V only {v:+.1f}%")
    kv = next((c for c in run.checks if c.id == "KVREAL"), None)
    if kv is not None and any(x.verdict in _BAD for x in kv.cells):
        for note in kv.notes:
            m = _KV_NOTE.match(note)
            if m and m.group(2) == "K" and int(m.group(3)) >= K_SHARE_MIN:
                layers = [w.split(" ")[0].lstrip("KV") for w in m.group(4).split(", ") if w.startswith("K")][:2]
                said.setdefault(m.group(1), []).append(
                    f"K carries {m.group(3)}% of {m.group(1)}'s attention-output error"
                    + (f", worst in layer{'s' if len(layers) > 1 else ''} {' and '.join(layers)}" if layers else ""))
    bad_types = {t for cid, x in _bad_cells(run) if cid in ("SWEEP", "KVREAL") for t in x.type.split("/")}
    return [RootCause("k_side", _sentence("k_side", types=t, evidence="; ".join(ev)), {t}, {"SWEEP", "KVREAL"}, True)
            for t, ev in sorted(said.items()) if t in bad_types]


def root_causes(run: Run) -> list[RootCause]:
    """The root causes the run's evidence shows, most basic first (a missing type before what its absence breaks)."""
    out = []
    for t, paths in sorted(_by_cause(run, "missing_type").items()):
        out.append(RootCause("missing_type", _sentence("missing_type", types=t), {t}))
    traits: dict[str, set[str]] = {}
    for x in (x for c in run.checks for x in c.cells if x.verdict != Verdict.PASS):  # SKIPs it caused say it too
        m = _TRAIT.search(x.caveat or "")
        if m:
            traits.setdefault(m.group(1), set()).update(p for p in x.type.split("/") if p.startswith("turbo"))
    for fn, ts in sorted(traits.items()):
        if ts:
            out.append(RootCause("missing_trait", _sentence("missing_trait", types=_join(ts), fn=fn), ts))
    zero = _by_cause(run, "zero_indices")
    if zero:
        paths = sorted({p for ps in zero.values() for p in ps})
        out.append(RootCause("zero_indices", _sentence("zero_indices", types=_join(zero), paths=", ".join(paths)),
                             set(zero)))
    return out + _k_side(run)
