"""Run the PolarQuant checks on a target and write the report, one check at a time.

The report is rewritten after every check, so an interrupted or crashed run keeps what it measured; from the start
it is marked RUNNING with the checks not run yet (:mod:`harness.unfinished`) until its final write, so a run killed
where no signal handler can act (SIGKILL, out of memory) is never read as finished.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from harness import __version__
from harness.checks.common import Context, annotate_modes, crash_cell, load_thresholds
from harness.checks.contract import Registry
from harness.checks.registry import REGISTRY
from harness.errors import HarnessError, ProbeCrash
from harness.fork import backends
from harness.interrupt import Interrupted, acknowledge, raise_if_pending
from harness.reference import turbo as T
from harness.report.model import CheckResult, Run, merge_previous
from harness.report.plots import in_background as plots_in_background
from harness.report.render import write_all
from harness.targets.base import Target
from harness.unfinished import running_mark

KNOWN_BACKENDS = backends.names()  # the backend table (harness/fork/backends.py)


def all_checks(optional: bool = False, registry: Registry | None = None) -> dict:
    """{check id: :class:`~harness.checks.contract.Check`} of the registry (default
    :data:`harness.checks.registry.REGISTRY`), in run order: the default set (what `verify` and replays run), plus,
    with ``optional=True``, the opt-in checks (``in_verify=False``, e.g. MODEL and KVREAL, which run a model). Checks of
    another command (SWEEP) are not among them: run_checks refuses them."""
    reg = registry or REGISTRY
    return {cid: reg.get(cid) for cid in reg.ids(optional)}


def default_checks(registry: Registry | None = None) -> list[str]:
    """Check ids `verify` runs without --checks: every registered check but the opt-in ones."""
    return (registry or REGISTRY).default_ids()


def new_run_id(prefix: str = "run") -> str:
    """A run folder name: prefix, UTC-free local timestamp and the process id (unique per machine)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def gpu_info() -> str | None:
    """GPU name and driver from nvidia-smi / rocm-smi / system_profiler, or None."""
    probes = [["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
              ["rocm-smi", "--showproductname"]]
    if sys.platform == "darwin":
        probes.append(["sysctl", "-n", "machdep.cpu.brand_string"])
    for cmd in probes:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def pick_target_backend(target: Target, requested: str | None) -> str:
    """The production backend: the requested one (must exist), else the first local GPU found, else cpu.

    Raises:
        HarnessError: the requested backend is not in this build.
    """
    names = [b.name for b in target.backends()]
    if requested:
        if requested not in names:
            from harness.usage import backend_name, unavailable_backend
            why = getattr(target, "missing_device", lambda b: None)(requested)
            if why:
                raise HarnessError(f"--target {requested}: {why}")
            raise unavailable_backend(backend_name(requested, "--target"), names, "--target")
        return requested
    # a remote device (rpc0, ...) is the production target only when asked (--target rpc0): ggml RPC calls every
    # remote device a GPU, whatever backend the server runs
    gpus = [b.name for b in target.backends() if b.is_gpu and not b.name.startswith("rpc")]
    return gpus[0] if gpus else ("cpu" if "cpu" in names else names[0])


def rules_of(thresholds: dict) -> dict:
    """The rules a run was judged by, as stored in run.json (``meta['rules']``): {section: {key: value}} without
    the reasons, so that ``turbo-harness diff`` can say when two runs used other limits or sizes."""
    return {sec: {k: v for k, v in entries.items() if not k.endswith("_reason")}
            for sec, entries in thresholds.items() if isinstance(entries, dict)}


def run_checks(target: Target, check_ids: list[str], types: list[str], run_dir: Path, target_backend: str | None = None,
               backends: list[str] | None = None, meta: dict | None = None, thresholds: dict | None = None,
               log: Callable[[str], None] = print, run: Run | None = None, routes: list[str] | None = None,
               options: dict | None = None, registry: Registry | None = None, finish_later: bool = False) -> Run:
    """Run checks on a target and write reports into run_dir after each check.

    Args:
        target: the thing under test. check_ids: e.g. ['PQ1', 'PQ3']. types: turbo type names.
        run_dir: report folder (created). target_backend: production backend (see pick_target_backend).
        backends: restrict to these backend names (default all the target has).
        options: per-check options {check id: {...}} (e.g. MODEL's pairs, env, flash_attn).
        registry: the checks to choose from (default :data:`harness.checks.registry.REGISTRY`).
        finish_later: the caller writes the final report (:func:`harness.pipeline.finish`): the reports written here
            stay marked RUNNING to the end, so a run killed in its teardown is not shown as finished.
    Returns:
        The Run (also written as run.json, summary.md, junit.xml under run_dir).
    Raises:
        HarnessError: unknown check id or backend.
        Interrupted: a signal arrived (see :func:`harness.interrupt.interruptible`); the report written
            before re-raising is marked INTERRUPTED and lists the checks that did not run.
    """
    checks = all_checks(optional=True, registry=registry)
    for cid in check_ids:  # unknown, or a check of another command (SWEEP): one line naming the choices
        (registry or REGISTRY).runnable(cid)
    tb = pick_target_backend(target, target_backend)
    present = [b.name for b in target.backends()]
    if backends:
        missing = [b for b in backends if b not in present]
        if missing:
            from harness.usage import backend_name, unavailable_backend
            raise unavailable_backend(backend_name(missing[0], "--backend"), present, "--backend")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(target=target, target_backend=tb, types=list(types), thresholds=thresholds or load_thresholds(),
                  evidence_dir=run_dir / "evidence", backends_filter=backends, log=log,
                  not_available=[b for b in KNOWN_BACKENDS if b not in present], routes_filter=routes,
                  options=dict(options or {}))
    run = run or Run(run_id=run_dir.name)
    # this invocation's own state (an earlier interrupted run into the same folder is resumed): running until the end
    run.interrupted = running_mark(check_ids, [], run)
    current, finished = None, []
    try:
        run.meta.update({
            "harness_version": __version__,
            "command_line": " ".join(shlex.quote(a) for a in sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started)),
            "host": platform.node(), "platform": platform.platform(),
            "target_backend": tb,
            "backends_run": [b.name for b in ctx.backends()],
            "backend_modes": {b.name: {"mode": getattr(b, "mode", "executed"), "label": getattr(b, "mode_label", "executed"),
                                       "of": getattr(b, "family", b.name),
                                       "note": getattr(b, "mode_note", "") or b.description}
                              for b in ctx.backends()},
            "backends_not_available": [b for b in KNOWN_BACKENDS if b not in present],
            "types": sorted(set(run.meta.get("types", [])) | set(types)),  # an added check keeps the earlier types
            "gpu": gpu_info(), "target": target.describe(), "quantize_routes": routes or "all",
            **(meta or {}),
        })
        run.meta["not_run"] = [f"{b}: not available on this machine/build, nothing was measured on it"
                               for b in run.meta["backends_not_available"]]
        layouts = target.layouts()
        run.meta["layouts"] = layouts.describe()
        run.meta["layout_traits"] = {t: list(v) for t, v in layouts.traits.items()}  # absent type: not listed
        if layouts.unknown:
            run.meta["layout_notes"] = layouts.notes
        run.meta["rules"] = rules_of(ctx.thresholds)
        write_all(run, run_dir)  # marked RUNNING before anything is measured: a run killed from here on says so
        ctx.done.update({c.id: c.cells for c in run.checks})  # what ran on which backend: AUDIT's examination table
        for cid in check_ids:  # work that goes on beside the checks before its own (COMPAT's test-backend-ops)
            if checks[cid].prestart is not None:
                checks[cid].prestart(ctx)
        for cid in check_ids:
            raise_if_pending()
            current = cid
            check = checks[cid]
            t0, calls0, parts = time.time(), _call_stats(target), {}
            cr = CheckResult(id=cid, title=check.title)
            if "source" in check.needs and target.source_dir() is None:  # nothing to read: SKIP, judges nothing
                cr.not_applicable = "this target has no fork source to read (not a fork build)"
                cr.notes = [f"not run: {cr.not_applicable}"]
            try:
                if not cr.not_applicable:
                    with T.layouts_in_use(layouts):
                        out = check.evaluate(ctx)
                    raise_if_pending()
                    cr.cells, cr.notes, cr.tables = list(out), list(out.notes), list(out.tables)
                    parts = dict(getattr(out, "timings", {}))
                    annotate_modes(cr.cells, ctx.backends())
            except ProbeCrash as e:  # a fork crash outside any cell: the fork's fault (FAIL), not the harness's
                cr.cells = [crash_cell(ctx, cid, "all", tb, "-", e)]
            except HarnessError as e:
                cr.error = str(e)
            except Exception as e:  # a harness bug: this check is an ERROR, the remaining checks still run
                cr.error = f"harness error {type(e).__name__}: {e}"
            cr.duration_s = time.time() - t0
            cost = _cost(calls0, _call_stats(target), parts)  # where the time went (issue 23: a GPU's per-call cost)
            if cost:
                run.meta.setdefault("check_costs", {})[cid] = cost
            earlier = next((c for c in run.checks if c.id == cid), None)
            if earlier is not None and not cr.error:  # keep what this run did not redo (other types or backends)
                kept = merge_previous(earlier, cr, list(types), [b.name for b in ctx.backends()], KNOWN_BACKENDS)
                if kept:
                    log(f"{cid}: kept the earlier cells of {', '.join(kept)} in this report; replaced {', '.join(types)}")
                for table in cr.tables:  # the same table in the earlier report, or as a section of a 1.0 report
                    legacy = table.from_legacy_section(run.sections.pop(table.id, None))
                    old = next((t for t in earlier.tables if t.id == table.id), legacy)
                    if old is not None:
                        table.merge_previous(old, list(types), [b.name for b in ctx.backends()])
            order = list(checks)
            run.checks = sorted([c for c in run.checks if c.id != cid] + [cr],
                                key=lambda c: order.index(c.id) if c.id in order else len(order))
            finished.append(cid)
            run.interrupted = running_mark(check_ids, finished, run) if finish_later or cid != check_ids[-1] else None
            ctx.done[cid] = cr.cells
            current = None
            log(f"{cid:6s} {cr.verdict.value:8s} {cr.duration_s:6.1f} s  {check.title}")
            if parts:
                log(f"{'':23s}{cost_line(cost)}")
            if cid == check_ids[-1]:
                write_all(run, run_dir)  # the last write waits for every plot: the finished report has them all
            else:
                with plots_in_background():  # this check's plot is drawn while the next one measures
                    write_all(run, run_dir)
    except Interrupted as e:
        acknowledge()
        not_run = [c for c in check_ids if c not in finished]
        earlier = {c.id: c.verdict.value for c in run.checks if c.id in not_run}  # from the report in the folder
        run.interrupted = {"signal": e.name, "exit_code": e.exit_code, "in_progress": current, "not_run": not_run,
                           **({"earlier": earlier} if earlier else {})}
        write_all(run, run_dir)
        log(f"INTERRUPTED by {e.name}: not run {', '.join(not_run) or 'none'}; partial report in {run_dir}"
            + (f" (it still shows the earlier run's {', '.join(earlier)}, marked as earlier)" if earlier else ""))
        raise
    return run


def _call_stats(target) -> dict | None:
    """The target's cumulative probe-call counts (:meth:`harness.targets.fork.ForkTarget.call_stats`), or None for a
    target without them."""
    fn = getattr(target, "call_stats", None)
    return fn() if callable(fn) else None


def _cost(before: dict | None, after: dict | None, parts: dict) -> dict:
    """One check's cost: {'probe_calls', 'probe_s' (seconds in calls), 'by_method' {method: [calls, s]},
    'batch_events'} between two :func:`_call_stats` readings (when the target counts calls), and 'parts_s' (the
    check's own :attr:`Outcome.timings`, when it has some); {} when there is neither."""
    out: dict = {"parts_s": parts} if parts else {}
    if before is None or after is None:
        return out
    by = {m: [n - before["by_method"].get(m, [0, 0.0])[0], round(s - before["by_method"].get(m, [0, 0.0])[1], 3)]
          for m, (n, s) in after["by_method"].items()}
    return {"probe_calls": after["calls"] - before["calls"], "probe_s": round(after["seconds"] - before["seconds"], 3),
            "by_method": {m: v for m, v in by.items() if v[0]},
            "batch_events": after["batch_events"][len(before["batch_events"]):], **out}


def cost_line(cost: dict) -> str:
    """'writes 0.5 s, writer matrix 1.2 s, ...; 13 probe calls, 2.4 s in them' for the console."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in cost.get("parts_s", {}).items())
    calls = f"; {cost['probe_calls']} probe calls, {cost['probe_s']:.1f} s in them" if "probe_calls" in cost else ""
    return parts + calls
