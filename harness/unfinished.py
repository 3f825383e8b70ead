"""A run that has not finished: marked RUNNING while it goes, INTERRUPTED when its process died without finishing.

Spec "Integrity of a verdict" / Interruption, and a tryout: `verify ... & kill -9 $!` left a report rewritten after
its first check with nothing saying the run was unfinished, so `report` said PASS (exit 0) for a run whose failing
check never ran. A signal the harness can catch marks the report INTERRUPTED (:mod:`harness.interrupt`); SIGKILL, an
out-of-memory kill or a crash of the interpreter cannot be caught, so the mark is written first instead:

* from the start of a run, the report's ``interrupted`` entry (the one the Ctrl-C path fills) says
  ``{'state': 'running', 'not_run': [checks not finished yet], 'pid', ...}``: run.json's verdict is RUNNING, summary.md
  and report.html list the checks not run yet, junit.xml has an error case per check not run; every reader that
  knows interrupted reports (diff, scorecard) sees a partial run, never a PASS;
* the final write of the run clears it (:func:`harness.pipeline.finish`; a Ctrl-C replaces it with the signal);
* a report still marked running whose folder no live process holds (:func:`harness.runlock.held_elsewhere`) is a run
  that died unfinished: :func:`settle` turns the mark into ``'state': 'unfinished'``, shown as INTERRUPTED with the
  checks not run and exit code 130 (:data:`EXIT_CODE`), as Ctrl-C exits. Rerunning the command resumes it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

# The exit code of a run read back unfinished: what Ctrl-C gives (128 + SIGINT), the code README names for an
# interrupted run; the real cause (SIGKILL, a crash) is not known to the reader.
EXIT_CODE = 130
RUNNING, UNFINISHED = "running", "unfinished"
DIED = "the run did not finish (its process was killed, e.g. kill -9 or out of memory, crashed or stopped on an error)"


def running_mark(asked: list[str], finished: list[str], run, units: str = "checks") -> dict:
    """The ``Run.interrupted`` entry of a run in progress: ``asked`` (check ids, in order), those ``finished`` so far.

    ``earlier`` names the unfinished ones whose results from an earlier run in the folder the report still shows
    (they are marked as the earlier run's, :meth:`harness.report.model.Run.earlier`). ``signal`` holds a readable
    cause, so that readers that print 'interrupted by <signal>' say something true."""
    not_run = [c for c in asked if c not in finished]
    earlier = {c.id: c.verdict.value for c in run.checks if c.id in not_run}
    return {"state": RUNNING, "signal": "nothing yet (the run is still going, or it died: see `turbo-harness report`)",
            "exit_code": EXIT_CODE, "in_progress": not_run[0] if not_run else None, "not_run": not_run,
            "asked": list(asked), "units": units, "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **({"earlier": earlier} if earlier else {})}


def mark_folder_running(run_dir: Path) -> bool:
    """Mark the report already in ``run_dir`` (an earlier run's) RUNNING before a command that writes its report only
    at its end (``sweep``) starts measuring: killed before its final write, the folder then reads as unfinished, never
    as the earlier run's result. Its checks are listed as not run and their results marked as the earlier run's.
    The sub-reports of a cross-backend sweep (``<out>/<backend>/run.json``) are marked too. The caller holds the
    folder's lock (:func:`harness.pipeline.prepare_run_dir`). Returns False when the folder holds no report (a kill
    then leaves no run.json, which ``report`` refuses)."""
    from harness.pipeline import load_run
    from harness.report.render import write_all
    if not (Path(run_dir) / "run.json").is_file():
        return False
    for d in [Path(run_dir), *sorted(p for p in Path(run_dir).iterdir() if (p / "run.json").is_file())]:
        run = load_run(d)  # an earlier mark of a run that died reads as unfinished here (settle)
        before = run.interrupted  # a partial report stays partial when unmark_folder puts it back
        run.interrupted = {**running_mark([c.id for c in run.checks], [], run), "before": before}
        write_all(run, d)
    return True


def unmark_folder(run_dir: Path) -> None:
    """Put back the earlier report that :func:`mark_folder_running` marked in this process, when the command ends
    without writing its own (an error, or a signal before anything ran): the folder's report is the earlier run's
    again, unchanged (a partial one, interrupted or unfinished, stays so: the mark keeps its entry as 'before').
    A mark another process wrote is left alone."""
    from harness.pipeline import load_run
    from harness.report.render import write_all
    for d in [Path(run_dir), *(sorted(p for p in Path(run_dir).iterdir() if (p / "run.json").is_file())
                               if Path(run_dir).is_dir() else [])]:
        if not (d / "run.json").is_file():
            continue
        run = load_run(d)  # a mark of this process's own reads as unfinished here (this process holds the lock)
        if isinstance(run.interrupted, dict) and run.interrupted.get("state") in (RUNNING, UNFINISHED) \
                and run.interrupted.get("pid") == os.getpid():
            run.interrupted = run.interrupted.get("before")  # None for a finished report; else still partial
            write_all(run, d)


def is_running(info) -> bool:
    """Whether a ``Run.interrupted`` entry is the mark of a run in progress (see :func:`running_mark`)."""
    return isinstance(info, dict) and info.get("state") == RUNNING


def settle(run, run_dir: Path) -> str | None:
    """When ``run`` (read from ``run_dir``) is marked running but no live process holds the folder, mark it
    unfinished (shown as INTERRUPTED, exit :data:`EXIT_CODE`) in place and return the one line that says so; None
    otherwise (finished, interrupted by a signal, or still being written)."""
    from harness.runlock import held_elsewhere
    info = run.interrupted
    if not is_running(info) or held_elsewhere(run_dir):
        return None
    info.update(state=UNFINISHED, signal=f"nothing the harness could catch: {DIED}", exit_code=EXIT_CODE,
                during=f"{DIED}; found by a reader of the report")
    not_run = info.get("not_run") or []
    return (f"{Path(run_dir) / 'run.json'}: {DIED} (PID {info.get('pid', '?')}, started {info.get('since', '?')}): shown "
            f"as INTERRUPTED, {info.get('units', 'checks')} not run: {', '.join(not_run) or 'none'}; rerun the same "
            f"command to finish it")


def cause(info: dict) -> str:
    """How the partial report came about, after its headline word: 'by SIGINT', 'so far (PID 12 is running ...)',
    'by nothing the harness could catch: the run did not finish (...)'."""
    if is_running(info):
        return f"so far (started by PID {info.get('pid', '?')} at {info.get('since', '?')}; not finished yet)"
    return f"by {info.get('signal', 'a signal')}"
