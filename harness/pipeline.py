"""One pipeline for every command that judges something: run folder -> checks -> reports -> exit code.

``verify`` / ``check`` (:func:`run_verify`), ``sweep`` and ``replay`` all go through it: the report folder is
prepared and a report already there is kept, refused or replaced by the same rules (:func:`prepare_run_dir`);
checks run through :func:`harness.verify.run_checks` (which writes the reports after every check); the end is
:func:`finish`: judge against a known-findings file (or drop an earlier judgement), write every report, and return
the exit code (README "Exit codes"). The CLI modules only parse options, call these and print.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.report.model import Run

# what a report folder holds: a checks report (verify, check, replay) or a sweep report
KINDS = ("checks", "sweep")


def load_run(run_dir: Path, log: Callable[[str], None] | None = None, fix: str | None = None) -> Run:
    """The Run stored in run_dir/run.json, re-judged from its evidence (:func:`harness.report.rejudge.rejudge`: each
    cell from its value, threshold and op, never from the verdict string it carries); a report still marked running
    whose folder no live process holds is marked unfinished (INTERRUPTED, :func:`harness.unfinished.settle`). ``log``
    gets the one line that says so for each. Raises HarnessError when missing or not a run report (one line: what the
    file is, and ``fix``, default the fix for a folder given to read)."""
    from harness.report.rejudge import rejudge, rejudge_line
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        from harness.runlock import LOCK_NAME, held_elsewhere
        if (Path(run_dir) / LOCK_NAME).is_file():  # a run started here and has written no report (yet)
            if held_elsewhere(run_dir):
                raise HarnessError(f"{p} not found yet: a run is writing {run_dir} now (it holds the folder's lock); "
                                   f"read it when that run has ended")
            raise HarnessError(f"{p} not found: a run started in {run_dir} ended before it wrote any result (killed, "
                               f"or stopped before its first job finished): nothing was measured; rerun the same command")
        raise HarnessError(f"{p} not found: give a run folder written by turbo-harness")
    from harness.report.model import NotAReport
    try:
        run = Run.from_dict(json.loads(p.read_text()))
    except NotAReport as e:
        raise HarnessError(f"{p} is not a run report this turbo-harness reads ({e}); it is left as it is: " + (
            fix or "give a run folder written by turbo-harness (verify, check, sweep), or move that run.json away")) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = (f"field {e} is missing" if isinstance(e, KeyError) else "not JSON" if isinstance(e, json.JSONDecodeError)
               else str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        raise HarnessError(f"{p} is not a readable turbo-harness run report ({why}): it is left as it is; " + (
            fix or "restore it from the run's copy, or move it away and give the folder again")) from None
    except OSError as e:
        raise HarnessError(f"{p} cannot be read ({e.strerror}): give a run folder you can read") from None
    from harness.unfinished import settle
    for line in (settle(run, Path(run_dir)), rejudge_line(rejudge(run))):
        if line and log is not None:
            log(line)
    return run


def _ids_in(run_dir: Path) -> list[str]:
    """Check ids of the report in run_dir ('?' when it cannot be read)."""
    try:
        return [str(c.get("id")) for c in json.loads((Path(run_dir) / "run.json").read_text()).get("checks", [])]
    except (OSError, ValueError, AttributeError):
        return ["?"]


SWEEP_IDS = ("SWEEP", "XBACKEND")  # the checks of sweep reports (one backend, or several compared)


def prepare_run_dir(run_dir: Path, kind: str, option: str = "--out") -> tuple[Path, Run | None]:
    """Make sure a report of ``kind`` can be written into ``run_dir`` and say what is there already.

    A checks report is added to an earlier checks report in the folder (returned, to be merged); for a sweep None is
    returned: the sweep command keeps an earlier sweep's pairs itself, or refuses one of other settings
    (:func:`harness.sweep_inputs.keep_earlier_pairs`). A folder holding the other kind of report is refused.

    Returns:
        (run_dir, the earlier checks report to add to, or None).
    Raises:
        HarnessError: run_dir is a file, cannot be written, or holds the other kind of report (one line, the fix).
    """
    from harness import usage
    run_dir = Path(run_dir)
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    if run_dir.exists() and not run_dir.is_dir():
        raise HarnessError(f"{option} {run_dir} is a file: give a folder for the report")
    usage.writable_dir(run_dir, option)
    from harness import runlock
    runlock.acquire(run_dir, option)  # one writer per folder: the merge below is read-modify-write under the lock
    try:
        return run_dir, _previous(run_dir, kind, option)
    except BaseException:
        runlock.release(run_dir)
        raise


def _previous(run_dir: Path, kind: str, option: str) -> Run | None:
    """The earlier checks report in run_dir to add to (None for none or a sweep); HarnessError for a folder holding
    the other kind of report or an unreadable one (see :func:`prepare_run_dir`)."""
    previous = None
    fix = f"give a new {option} folder (or move {run_dir / 'run.json'} away)"
    if (run_dir / "run.json").is_file():
        ids = _ids_in(run_dir)
        if ids == ["?"]:  # unreadable: never merged into, never overwritten
            load_run(run_dir, fix=fix)  # raises the one line that says what the file is and the fix
            raise HarnessError(f"{option} {run_dir} holds a run.json that is not a readable turbo-harness report: it is "
                               f"left as it is; give a new {option} folder (or move {run_dir / 'run.json'} away)")
        if kind == "checks":
            if {"SWEEP", "XBACKEND"} & set(ids):
                raise HarnessError(f"{option} {run_dir} holds a sweep report: give another folder for the checks")
            previous = load_run(run_dir, fix=fix)
        elif [i for i in ids if i not in SWEEP_IDS]:
            raise HarnessError(f"{option} {run_dir} holds another report ({', '.join(i for i in ids if i not in SWEEP_IDS)}): "
                               f"a sweep would overwrite it; give a new folder")
    return previous


def refuse_other_build(previous: Run, meta: dict, target_name: str, run_dir: Path) -> None:
    """Raise HarnessError when the report already in run_dir was made from another build (never merged)."""
    from harness.fork import build as fb
    old = dict(fb.build_identity(previous.meta), target=(previous.meta.get("target") or {}).get("target"))
    new = dict(fb.build_identity(meta), target=target_name)
    if old != new:
        diff = [k for k in new if old.get(k) != new.get(k)]

        def show(m):
            return (f"fork {fb.source_label(m.get('fork_commit'), m.get('fork_dirty'), m.get('fork_diff_sha256'))}, "
                    f"build {m.get('build_dir') or '?'}")
        raise HarnessError(f"--out {run_dir} holds a report of another build ({show(old)}; this run: {show(new)}; "
                           f"differs in {', '.join(diff)}): reports of different builds are never merged, give a new --out folder")


def open_target(fork_dir: str | None, build_backend: str | None, rpc=None):
    """The fork build to measure and the report metadata that names it (``verify`` / ``check``): (target, meta).

    ``rpc`` (:class:`harness.cli_rpc.RpcOptions`, optional) adds remote devices: the build must have
    the RPC backend, and the servers must be reachable (one-line HarnessError otherwise).

    The fork commit, dirty state and options come from the build's own record
    (turbo-harness-build.json), never from the checkout, which may have moved since; the checkout's
    state is kept beside it as ``checkout_*``. Raises HarnessError (one line) when the checkout differs
    from what the build was built from (:func:`harness.fork.build.check_provenance`).
    """
    from harness.fork import build as fb
    from harness.targets.fork import ForkTarget
    fork = fb.fork_dir(fork_dir)
    fb.require_turbo(fork)
    bdir = fb.find_build(build_backend, fork)
    meta = fb.read_build_meta(bdir)
    state = fb.git_state(fork)
    fb.check_provenance(bdir, fork, meta, state)
    if not meta:  # a build the harness did not make: what it was built from is not known, so it is not claimed
        meta = {"fork_commit": "unknown", "fork_dirty": None,
                "provenance_note": f"{bdir} has no {fb.BUILD_META}: the fork commit it was built from is unknown "
                                   f"(rebuild with `turbo-harness build` to record it)"}
    else:
        meta["provenance_note"] = f"fork commit, dirty state and options as recorded in {bdir / fb.BUILD_META}"
        if state.get("commit") in (None, "", "unknown"):
            meta["provenance_warning"] = (f"the checkout {fork} names no commit (no .git, no .fork-commit): it cannot be "
                                          f"checked against the build's record; the report names the build's record")
    meta.update({f"checkout_{k}": v for k, v in state.items()})
    meta.update({"checkout_dir": str(fork), "build_dir": str(bdir)})
    if rpc is not None and rpc.active:
        return rpc.open(bdir, fork), meta
    return ForkTarget(bdir, fork), meta


def check_backends(target, target_backend: str | None, backends: list[str]) -> None:
    """The backends asked for exist in the target: said before anything is printed or written.

    Raises:
        HarnessError: a requested production backend or ``--backend`` that the build lacks (with the fix).
    """
    from harness import usage
    from harness.verify import pick_target_backend
    pick_target_backend(target, target_backend)
    present = [b.name for b in target.backends()]
    for b in backends:
        if b not in present:
            raise usage.unavailable_backend(b, present, "--backend")


def finish(run: Run, run_dir: Path, known: list | None = None, known_file: str | None = None, strict: bool = False,
           write: Callable[[Run, Path], object] | None = None, written: bool = False) -> int:
    """The end of every run: judge it against a known-findings file (or drop the judgement of an earlier run in
    the folder), write every report, and return the exit code.

    Args:
        known: entries of :func:`harness.known.load_known` (None: no gate). known_file: its path, for the report.
        strict: exit 1 on PARTIAL too (without a known-findings file).
        write: the report writer (default :func:`harness.report.render.write_all`; a sweep also writes its CSVs).
        written: the reports in run_dir are already those of ``run`` (verify writes after every check): they are
            written again only when the known-findings judgement changed them, or when they still say RUNNING.
    Returns:
        0 no FAIL/ERROR, 1 a FAIL (or PARTIAL with ``strict``, or a new/grown/fixed finding with a gate), 2 an
        ERROR, 130 / 143 for an interrupted run (:func:`harness.known.gate_exit_code`).
    """
    from harness.known import apply_known, clear_known, gate_exit_code
    from harness.report.render import write_all
    from harness.unfinished import is_running
    if is_running(run.interrupted):  # the final write: the run's RUNNING mark (harness.unfinished) goes only now
        run.interrupted, written = None, False
    changed = known is not None
    if changed:
        apply_known(run, known, known_file)
    else:
        changed = clear_known(run)  # judged against a file earlier in this folder: not this time
    if changed or not written:
        (write or write_all)(run, Path(run_dir))
    return gate_exit_code(run, strict)


def run_verify(target, meta: dict, check_ids: list[str], types: list[str], run_dir: Path, previous: Run | None,
               *, target_backend: str | None = None, backends: list[str] | None = None, registry=None,
               options: dict | None = None, routes: list[str] | None = None, log: Callable[[str], None] = print,
               finish_later: bool = False) -> Run:
    """The checks of verify / check / replay on an opened target into run_dir (added to ``previous`` when given);
    ``routes``: only these quantise routes (a replay of a commit where another route crashes); ``finish_later``: the
    caller ends with :func:`finish`, which clears the report's RUNNING mark (see :func:`harness.verify.run_checks`).

    Raises:
        HarnessError: ``previous`` is a report of another build; bad check ids or backends.
        Interrupted: a signal arrived (the partial report is written and marked; see run_checks).
    """
    from harness.verify import run_checks
    if previous is not None:
        refuse_other_build(previous, meta, target.name, run_dir)
    return run_checks(target, check_ids, types, run_dir, target_backend=target_backend, backends=backends, meta=meta,
                      log=log, run=previous, registry=registry, options=options, routes=routes, finish_later=finish_later)
