"""The one check contract and its registry.

A check is a module in ``harness/checks/`` that defines ``CHECK = Check(...)``: its id, title, the section of
``checks/thresholds.toml`` that holds its rules, what it needs (the probe, a fork binary, a model), whether the
default ``verify`` runs it, which injected NumPy-target faults it must catch, and ``run(ctx)``. ``run`` returns
data only: an :class:`Outcome` (its cells, plus notes and :class:`~harness.report.model.Table` s), or a plain list
of cells. It starts no process itself: the fork's tools are run by the target (e.g.
:meth:`harness.targets.base.Target.backend_ops`) and reach the check as observations.

:data:`harness.checks.registry.REGISTRY` is built once, at its import, by discovering those modules; ``verify``, ``check``, ``list``,
``replay``, the fault-injection tests and the README all read it. Nothing writes it afterwards: a caller that
wants another set of checks (a test with a toy check) makes a new registry with :meth:`Registry.with_check`
and passes it on (the CLI takes it as ``obj``).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from harness.errors import HarnessError
from harness.report.model import Cell, Table


class Outcome(list):
    """What a check returns: its cells (this is a ``list`` of :class:`Cell`) plus ``notes`` (one-line strings for
    the report) and ``tables`` (:class:`Table` s every renderer shows); ``timings`` {part: seconds} says where a
    check's time went (the run's ``check_costs`` metadata and the console; never a cell)."""

    def __init__(self, cells: Iterable[Cell] = (), notes: Iterable[str] = (), tables: Iterable[Table] = ()):
        super().__init__(cells)
        self.notes: list[str] = list(notes)
        self.tables: list[Table] = list(tables)
        self.timings: dict[str, float] = {}

    @classmethod
    def of(cls, result) -> "Outcome":
        """An Outcome from a check's return value (an Outcome is kept as it is; a list of cells gets no notes)."""
        return result if isinstance(result, Outcome) else cls(result or [])


@dataclass(frozen=True)
class Check:
    """One registered check.

    Attributes:
        id: short id shown everywhere ('PQ1', 'COMPAT'); upper case, unique in a registry.
        title: one line saying what it verifies.
        run: ``run(ctx: harness.checks.common.Context) -> Outcome | list[Cell]``; starts no process.
        order: position in run order and in reports (ascending).
        rules: section of ``checks/thresholds.toml`` with its thresholds ('' when it has none).
        needs: what it measures through: 'probe' (the native probe or a NumPy target), 'test-backend-ops',
            'llama-perplexity', 'llama-save-load-state', 'model', 'corpus'. A need that a target lacks makes
            SKIP cells with the reason (the check says so itself); the list is shown by ``list`` and the README.
        in_verify: whether ``verify`` runs it without ``--checks`` (False: opt-in, e.g. it runs a model).
        catches: {NumPy-target fault: verdicts it must give} (harness.targets.numpy_target faults); the
            fault-injection tests read this table.
        command: the command that runs it: 'verify' (also ``check`` and ``replay``), or 'sweep' for a check judged
            from the sweep's own runs (its ``run`` is not called by verify).
        rules_file: the TOML file of its rules (None: ``checks/thresholds.toml``); with ``rules`` '' every section.
        prestart: ``prestart(ctx)``, called by verify before the first check when this one is to run: begins work
            that can go on beside the other checks (COMPAT's test-backend-ops on a machine with cores to spare).
    """

    id: str
    title: str
    run: Callable
    order: int
    rules: str = ""
    needs: tuple[str, ...] = ("probe",)
    in_verify: bool = True
    catches: dict = field(default_factory=dict)
    command: str = "verify"
    rules_file: Path | None = None
    prestart: Callable | None = None

    def evaluate(self, ctx) -> Outcome:
        """Run the check on a context and return its :class:`Outcome`."""
        return Outcome.of(self.run(ctx))


class Registry:
    """An ordered, read-only set of checks with unique ids.

    Raises:
        HarnessError: two checks with the same id.
    """

    def __init__(self, checks: Iterable[Check] = ()):
        seen: dict[str, Check] = {}
        for c in checks:
            if c.id in seen:
                raise HarnessError(f"two checks registered as {c.id}: {seen[c.id].title!r} and {c.title!r}; "
                                   f"give one of them another id")
            seen[c.id] = c
        self._checks = tuple(sorted(seen.values(), key=lambda c: c.order))

    @classmethod
    def discover(cls, package: str = "harness.checks") -> "Registry":
        """The checks of every module of ``package`` that defines ``CHECK`` (a :class:`Check`)."""
        pkg = importlib.import_module(package)
        found = []
        for info in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"{package}.{info.name}")
            if isinstance(getattr(mod, "CHECK", None), Check):
                found.append(mod.CHECK)
        return cls(found)

    def with_check(self, check: Check) -> "Registry":
        """A new registry with one more check (this one is unchanged). Raises HarnessError on an id conflict."""
        return Registry(self._checks + (check,))

    def __iter__(self) -> Iterator[Check]:
        return iter(self._checks)

    def __contains__(self, cid: str) -> bool:
        return any(c.id == cid for c in self._checks)

    def get(self, cid: str) -> Check:
        """The check with this id. Raises HarnessError naming the choices."""
        for c in self._checks:
            if c.id == cid:
                return c
        raise HarnessError(f"unknown check {cid}: choose from {', '.join(self.ids())}")

    def runnable(self, cid: str) -> Check:
        """The check with this id, if ``verify``/``check`` can run it.

        Raises:
            HarnessError: unknown id, or a check of another command (names that command).
        """
        c = self.get(cid)
        if c.command != "verify":
            raise HarnessError(f"{c.id} runs through `turbo-harness {c.command}`, not verify/check: "
                               f"use `turbo-harness {c.command} --help`")
        return c

    def ids(self, optional: bool = True) -> list[str]:
        """Ids of the checks ``verify``/``check`` can run, in run order: all of them (``optional=True``) or only
        those ``verify`` runs by default. Checks of another command (SWEEP) are not among them."""
        return [c.id for c in self._checks if c.command == "verify" and (optional or c.in_verify)]

    def default_ids(self) -> list[str]:
        """The ids ``verify`` runs without ``--checks``."""
        return self.ids(optional=False)

    def parse_ids(self, value: str | None, option: str = "--checks") -> list[str]:
        """A comma-separated list of check ids (case-insensitive), validated; None gives the default set.

        Raises:
            HarnessError: an unknown id or an empty list (one line naming the choices).
        """
        if value is None:
            return self.default_ids()
        ids = list(dict.fromkeys(c.strip().upper() for c in value.split(",") if c.strip()))
        bad = [c for c in ids if c not in self]
        if not ids or bad:
            raise HarnessError(f"{option} {value!r}: {'unknown check ' + ', '.join(bad) if bad else 'names no check'}; "
                               f"choose from {', '.join(self.ids())} (or leave it out for all)")
        for c in ids:  # registered, but run by another command (SWEEP): name that command
            self.runnable(c)
        return ids

