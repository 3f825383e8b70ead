"""Shared machinery of the checks: thresholds, the run context, cell verdict rules.

The measurements of the target that several checks share (the rotation op's matrix, centroid tables, decision
thresholds, decode routes) live one floor up, in :mod:`harness.checks.observations`.
"""
from __future__ import annotations

import json
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.interrupt import raise_if_pending
from harness.reference import turbo as T
from harness.report.model import Cell, Verdict
from harness.report.npz import save_npz
from harness.targets.base import Target

THRESHOLDS_FILE = Path(__file__).resolve().parents[2] / "checks" / "thresholds.toml"


def load_thresholds(path: Path | None = None, what: str = "threshold file") -> dict:
    """Thresholds as {section: {key: value}}; reasons under {section: {key + '_reason': text}}.

    Every entry in the TOML file is ``key = { value = ..., reason = "one line" }``.

    Raises:
        HarnessError: missing or malformed file, or an entry without a value and a reason.
    """
    p = Path(path or THRESHOLDS_FILE)
    try:
        raw = tomllib.loads(p.read_text())
    except OSError:
        raise HarnessError(f"{what} {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"{p}: {e}") from None
    out: dict = {}
    for sec, entries in raw.items():
        out[sec] = {}
        for k, v in entries.items():
            if not isinstance(v, dict) or "value" not in v or not v.get("reason"):
                raise HarnessError(f"{p}: [{sec}] {k} needs a value and a one-line reason")
            out[sec][k] = v["value"]
            out[sec][k + "_reason"] = v["reason"]
    return out


@dataclass
class Context:
    """Everything a check needs: the target, which backend is production, thresholds, evidence dir.

    Args:
        target: the thing under test.
        target_backend: production backend name (deviations there FAIL; elsewhere PARTIAL).
        types: turbo types to check.
        evidence_dir: folder for evidence files (None: keep nothing).
        seed: RNG seed for all generated data.
    """

    target: Target
    target_backend: str
    types: list[str]
    thresholds: dict
    evidence_dir: Path | None = None
    seed: int = 1234
    backends_filter: list[str] | None = None
    routes_filter: list[str] | None = None  # only these quantise routes (e.g. a replay of a commit whose set_rows crashes)
    not_available: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # per-check options, {check id: {...}} (e.g. a replay entry's MODEL pairs/env)
    done: dict = field(default_factory=dict)  # {check id: cells} of the checks already in this run's report
    _cache: dict = field(default_factory=dict)
    log: Callable[[str], None] = lambda s: None

    def rng(self, salt: str) -> np.random.Generator:
        """A generator seeded from the run seed and a fixed salt: the same data on every path and run."""
        return np.random.default_rng((self.seed + sum(ord(ch) * (i + 1) for i, ch in enumerate(salt)) * 7919) % (2 ** 32))

    def backends(self):
        bs = self.target.backends()
        if self.backends_filter:
            bs = [b for b in bs if b.name in self.backends_filter]
        return bs

    def th(self, sec: str, key: str):
        return self.thresholds[sec][key]

    def is_target(self, backend: str, route: str) -> bool:
        """Production path: on the target backend, and not the reference quantiser no model calls."""
        return backend == self.target_backend and route != "quantize_chunk"

    def cell(self, check: str, type_: str, backend: str, route: str, metric: str, value, threshold, raw: Verdict,
             op: str = "<=", caveat: str = "", evidence=None, details=None) -> Cell:
        """Make a cell, demoting a FAIL on a non-target path to PARTIAL (spec: target vs fallback)."""
        tgt = self.is_target(backend, route)
        path = f"{backend}:{route}"
        v = raw
        if raw == Verdict.FAIL and not tgt:
            v = Verdict.PARTIAL
            caveat = (caveat + "; " if caveat else "") + (
                f"only on non-target path {path}: anything that uses this path gets the deviation")
        return Cell(check=check, type=type_, path=path, metric=metric,
                    value=None if value is None else float(value),
                    threshold=None if threshold is None else float(threshold), verdict=v, op=op,
                    caveat=caveat, target=tgt, evidence=list(evidence or []), details=_jsonable(details or {}))

    def evidence(self, check: str, name: str, **arrays) -> list[str]:
        """Save arrays/numbers to <evidence_dir>/<check>/<name>.npz (+ .json summary of scalars).

        Returns the run-folder-relative paths (empty when evidence is not kept).
        """
        if self.evidence_dir is None:
            return []
        d = Path(self.evidence_dir) / check
        d.mkdir(parents=True, exist_ok=True)
        safe = name.replace(":", "_").replace("/", "_")
        save_npz(d / f"{safe}.npz", {k: np.asarray(v) for k, v in arrays.items()})  # fast deflate (harness/report/npz.py)
        return [f"evidence/{check}/{safe}.npz"]

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]


def annotate_modes(cells: list[Cell], backends) -> None:
    """Say in every cell how its backends were examined when that is not 'executed' (spec "Every backend, and how
    it was examined"): a cell whose path names a backend of another mode (metal-src:set_rows, 'cpu:set_rows x
    metal-src:set_rows'), or whose writer's bytes such a backend read or un-rotated (``details['reader']``,
    ``details['unrotated_by']``), gets that backend's description (e.g. "Metal source on the host CPU: ...") in its caveat
    and ``details['examined']``. Cells are changed in place."""
    import re
    notes = {b.name: getattr(b, "mode_note", "") or b.description or b.mode_label for b in backends
             if getattr(b, "mode", "executed") != "executed"}
    if not notes:
        return
    for c in cells:
        # a backend's source read by the audit ('vulkan:source') was not executed: it keeps no execution note; the
        # reader of a writer-only backend's bytes (details['reader'], harness.checks.readers) ran too
        where = " ".join([c.path or ""] + [str((c.details or {})[k]) for k in ("reader", "unrotated_by")
                                          if (c.details or {}).get(k)])
        named = [n for n in notes if re.search(rf"(^|[\s>]){re.escape(n)}:(?!source\b)", where)]
        for n in named:
            if notes[n] not in (c.caveat or ""):
                c.caveat = (c.caveat + "; " if c.caveat else "") + notes[n]
        if named:
            c.details = {**(c.details or {}), "examined": {n: notes[n] for n in named}}


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def crash_cell(ctx: Context, check: str, type_: str, backend: str, route: str, crash: ProbeCrash,
               case: str | None = None) -> Cell:
    """The cell of a fork crash on a configuration the backend accepted (the probe asks the backend
    whether it supports each op before running it, so a crash is past that answer): FAIL quoting the
    signal and what that call printed (spec "Who is at fault"); PARTIAL on a non-target path. The note names
    the case that crashed (``case``, e.g. 'turbo3/q8_0 D=128 nq=8 h=4/2'; default the type and path), so that
    many crash cells do not read alike."""
    what = case or f"{type_} on {backend}:{route}"
    return ctx.cell(check, type_, backend, route, "-", None, None, Verdict.FAIL,
                    caveat=f"fork failure on a configuration the backend accepted: {crash} (case {what})")


def guarded(ctx: Context, check: str, type_: str, backend: str, route: str, fn, case: str | None = None) -> list[Cell]:
    """Run fn() -> list[Cell] with the target's layouts in use (:func:`T.layouts_in_use`).

    Who is at fault decides the verdict of what goes wrong: Unsupported (the backend declines the op,
    or the type's layout is unknown to the reference) is a SKIP with the reason; a fork crash on an
    op the backend accepted (ProbeCrash) is a FAIL quoting the crash; a HarnessError (the harness could
    not measure) or any other exception (a harness bug, with its location) is an ERROR. ``case`` names the
    configuration in a crash cell's note (:func:`crash_cell`).
    """
    raise_if_pending()
    try:
        with T.layouts_in_use(ctx.target.layouts()):
            out = fn()
        raise_if_pending()
        return out
    except T.UnknownLayout as e:
        return [Cell(check=check, type=type_, path=f"{backend}:{route}", metric="-", value=None, threshold=None,
                     verdict=Verdict.SKIP, caveat=str(e), target=ctx.is_target(backend, route))]
    except Unsupported as e:
        return [Cell(check=check, type=type_, path=f"{backend}:{route}", metric="-", value=None, threshold=None,
                     verdict=Verdict.SKIP, caveat=f"not supported: {e}", target=ctx.is_target(backend, route))]
    except ProbeCrash as e:
        return [crash_cell(ctx, check, type_, backend, route, e, case)]
    except HarnessError as e:
        return [Cell(check=check, type=type_, path=f"{backend}:{route}", metric="-", value=None, threshold=None,
                     verdict=Verdict.ERROR, caveat=str(e), target=ctx.is_target(backend, route))]
    except Exception as e:  # a harness bug must not kill the run; it is an ERROR with its location
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return [Cell(check=check, type=type_, path=f"{backend}:{route}", metric="-", value=None, threshold=None,
                     verdict=Verdict.ERROR, caveat=f"harness error {type(e).__name__}: {e} at {tb.filename}:{tb.lineno}",
                     target=ctx.is_target(backend, route))]


def quant_paths(ctx: Context):
    """[(backend, route)] of every quantise path of the selected backends (and routes, when filtered)."""
    return [(b.name, r) for b in ctx.backends() for r in ctx.target.routes(b.name).quantize
            if not ctx.routes_filter or r in ctx.routes_filter]
