"""CLI: ``replay`` a fork commit, replay the bug ``catalogue``, ``bisect`` a verdict change.

Verdicts used by bisect are the checks' own lossy-aware verdicts (PASS vs PARTIAL/FAIL), never bit
equality; an ERROR (crash, no build) makes the step a ``git bisect skip``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from harness.cli_types import CommaList, ReportDir, existing_dir
from harness.errors import HarnessError
from harness.reference.turbo import TURBO_TYPES
from harness.replay import (bisect_head, build_commit, git_subject, history_dir, load_catalogue, resolve,
                            run_bisect)



def _route_names() -> list[str]:
    """Every quantise route a backend of the backend table has (harness/fork/backends.py)."""
    from harness.fork import backends
    return list(dict.fromkeys(r for b in backends.TABLE for r in b.quantize))


def _check_ids(value: str) -> list[str]:
    """--checks checked while parsing, by the registry the CLI reads."""
    from harness.cli import registry
    return registry().parse_ids(value)


TYPES = CommaList("turbo type", choices=lambda: TURBO_TYPES)
ROUTES = CommaList("quantise route", choices=_route_names)


def _checks(value: str | None, option: str = "--checks") -> list[str]:
    """The checks of a replay, validated by the registry the CLI reads (:func:`harness.cli.registry`) before
    anything is built: the given ids, or the default verify set without COMPAT (a replay builds one backend and
    no test-backend-ops)."""
    from harness.cli import registry
    reg = registry()
    return [c for c in reg.default_ids() if c != "COMPAT"] if value is None else reg.parse_ids(value, option)


def _types(value: str) -> list[str]:
    """The --type list, validated as verify validates it (:func:`harness.cli._types`)."""
    from harness.cli import _types as types_of
    return types_of(value)


def sanitizer_env(sanitize: str | None, log_dir: Path | None = None) -> dict | None:
    """The probe worker's environment for a sanitizer build: the runtime preloaded (the worker is a Python
    process that loads the instrumented ggml), leak checks off, reports also written under ``log_dir``
    (``asan.<pid>``) so that the verdict can quote them; None (inherit) without a sanitizer."""
    if not sanitize:
        return None
    cc = os.environ.get("CC") or "cc"
    lib = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not lib or not Path(lib).is_file():
        raise HarnessError(f"no AddressSanitizer runtime found ({cc} -print-file-name=libasan.so): install libasan "
                           f"(apt-get install libasan8) to replay with --sanitize address")
    opts = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        opts += f":log_path={Path(log_dir) / 'asan'}"
    return dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS=opts)


def sanitizer_reports(run_dir: Path) -> list[str]:
    """Headlines of the sanitizer reports a replay left under ``<run_dir>/evidence/sanitizer`` (see sanitizer_env)."""
    from harness.runners.crash import asan_report
    d = Path(run_dir) / "evidence" / "sanitizer"
    return [r for f in sorted(d.glob("asan*")) if (r := asan_report(f.read_text(errors="replace")))] if d.is_dir() else []


def replay_commit(fork: Path, rev: str, checks: list[str], types: list[str], routes: list[str] | None,
                  out: Path | None = None, log=click.echo, label: str = "", options: dict | None = None,
                  sanitize: str | None = None, prefer: str | None = None, backend: str = "cpu",
                  one_tree: bool | None = None):
    """Build ``rev`` (cached; only the targets the checks need) for ``backend`` (cpu, or cuda on a GPU machine),
    run the checks with that backend as the target and on it alone, write a report labelled with the commit. (The
    harness's host routes of the fork's other backends, such as metal-src, judge the Metal source of a commit; they
    are no part of the replay of the backend built.)

    The report folder follows the rules of every checks run (:func:`harness.pipeline.prepare_run_dir`, checked
    before anything is built): a sweep report there is refused, a checks report of the same build is added to,
    one of another build is refused.

    ``one_tree``: build in one source tree per flavour (:func:`harness.replay.build_commit`; machines without ccache);
    default ``$TURBO_REPLAY_ONE_TREE=1``.

    Returns (run, run_dir, built: bool - whether this call compiled anything new; ``run.meta`` has the build's
    ``build_seconds`` and ``build_cpu_seconds``).
    """
    from harness import pipeline
    from harness.cli import registry
    from harness.replay import targets_for
    from harness.report.render import write_all
    from harness.targets.fork import ForkTarget
    commit = resolve(fork, rev)
    one_tree = os.environ.get("TURBO_REPLAY_ONE_TREE") == "1" if one_tree is None else one_tree
    from harness.cli import REPORTS  # TURBO_REPORTS, else the checkout's reports/ (as verify's)
    run_dir, previous = pipeline.prepare_run_dir(out or REPORTS / f"replay-{commit[:10]}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                 "checks")
    src, bdir, meta = build_commit(fork, commit, targets=targets_for(checks, options), log=log, sanitize=sanitize,
                                   prefer=prefer, backend=backend, one_tree=one_tree)
    built = not meta.pop("reused", False)
    meta["replay_built"] = built
    target = ForkTarget(bdir, src, env=sanitizer_env(sanitize, run_dir / "evidence" / "sanitizer"))
    try:
        meta = dict(meta, fork_commit=commit, fork_dir=str(src), build_dir=str(bdir), replay_of=commit,
                    replay_label=label, fork_describe=git_subject(fork, commit))
        run = pipeline.run_verify(target, meta, checks, types, run_dir, previous, target_backend=backend, log=log,
                                  routes=routes, options=options, registry=registry(), backends=[backend])
    finally:
        target.close()
    if sanitize:  # quote the sanitizer's own report beside the probe's crash message
        run.meta["sanitizer_reports"] = sanitizer_reports(run_dir)
        for cr in run.checks:
            cr.notes += [f"{sanitize} sanitizer: {r}" for r in run.meta["sanitizer_reports"]]
        write_all(run, run_dir)
    return run, run_dir, built


@click.command()
@click.argument("commit")
@click.option("--checks", "check_list", default=None, type=CommaList("check id", check=_check_ids), help="comma-separated check ids (default PQ1-PQ6; MODEL builds the llama tools)")
@click.option("--type", "types", default=",".join(TURBO_TYPES), show_default=True, type=TYPES, help="turbo types, comma separated")
@click.option("--routes", default=None, type=ROUTES, help="only these quantise routes, e.g. quantize_chunk")
@click.option("--sanitize", type=click.Choice(["address"]), default=None, help="an AddressSanitizer build flavour")
@click.option("--fork-dir", default=None, type=existing_dir(), help="fork checkout with history (default $FORK_DIR or vendor/llama.cpp)")
@click.option("--out", default=None, type=ReportDir(), help="report folder (default reports/replay-<commit>-<time>)")
@click.option("--strict", is_flag=True)
def replay(commit, check_list, types, routes, sanitize, fork_dir, out, strict):
    """Build the fork at COMMIT (cached under .cache/replay) and run the checks on it."""
    from harness.interrupt import Interrupted, interruptible
    fork = history_dir(fork_dir)
    checks, ts = _checks(check_list), _types(types)
    try:
        with interruptible():  # as verify: the partial report is marked INTERRUPTED, exit 130 / 143
            run, run_dir, built = replay_commit(fork, commit, checks, ts, routes.split(",") if routes else None,
                                                Path(out) if out else None, sanitize=sanitize)
    except Interrupted as e:
        click.echo(f"interrupted by {e.name}: a replay whose checks had started has its partial report marked "
                   f"INTERRUPTED (summary.md of its report folder)", err=True)
        sys.exit(e.exit_code)
    from harness.pipeline import finish
    code = finish(run, run_dir, strict=strict, written=True)
    click.echo(f"{run.meta['fork_commit'][:12]}: {run.verdict.value}; report {run_dir / 'summary.md'}")
    sys.exit(code)


def judge_side(cr, sanitizer: list[str] | None = None) -> tuple[str, str]:
    """(verdict, evidence) of one replayed side, with the crash semantics of the spec.

    A cell that is ERROR because the fork's code crashed in a probe call (signal, abort, sanitizer report)
    counts as FAIL quoting the crash: the build accepted the type, so the crash is the fork's fault and is
    the bug being replayed; so is a SKIP whose reason is such a crash (a route probed and lost to a crash).
    A probe call killed by its timeout (a hang) is ERROR with that reason, also where the check made it FAIL.
    ``sanitizer``: headlines of sanitizer reports of the run; a crash is quoted with the first of them.
    """
    from harness.report.model import Verdict, worst
    from harness.runners.crash import classify_probe_message
    if cr.error:
        return "ERROR", cr.error
    judged = []
    for c in cr.cells:
        v, why = c.verdict, f"{c.type} {c.path}: {c.caveat}" if c.caveat else f"{c.type} {c.path} {c.metric}={c.value}"
        if v in (Verdict.ERROR, Verdict.SKIP, Verdict.FAIL):  # a crash is never a skip (a route probed and lost
            crash = classify_probe_message(c.caveat, bool(sanitizer))  # to a crash reads 'not supported'); a hang is
            if v == Verdict.FAIL and (crash is None or crash.fork_fault):  # ERROR even where a check called it FAIL
                judged.append((v, why))
                continue
            if crash and crash.fork_fault:
                what = f"AddressSanitizer report: {sanitizer[0]}" if sanitizer else crash.describe()
                v, why = Verdict.FAIL, f"{c.type} {c.path}: crash of the fork's code: {what}"
            elif crash:  # a hang, also one reported as a skipped route, is ERROR with the reason
                v, why = Verdict.ERROR, f"{c.type} {c.path}: hang: {crash.message}"
        judged.append((v, why))
    if not judged:
        return "SKIP", "no cells"
    w = worst(v for v, _ in judged)
    if w == Verdict.PASS:
        return "PASS", f"{len(judged)} cells within thresholds"
    return w.value, next(why for v, why in judged if v == w)


def entry_options(e: dict) -> dict:
    """Per-check options a catalogue entry names (MODEL: model, pairs, env, flash_attn, must_accept)."""
    keys = ("model", "pairs", "env", "flash_attn", "must_accept", "state", "ppl", "kld")
    opts = {k: e[k] for k in keys if k in e}
    return {e["check"]: opts} if opts else {}


def _prefer(e: dict) -> str | None:
    """'clang' when a catalogue entry says its commits build only with clang (its ``compiler`` field)."""
    return "clang" if str(e.get("compiler", "")).startswith("clang") else None


def _entry(eid: str) -> dict:
    e = next((x for x in load_catalogue() if x["id"] == eid), None)
    if e is None:
        raise HarnessError(f"unknown catalogue id {eid!r}: see checks/replays.toml")
    return e


def _expected(e: dict, side: str) -> str:
    return e[f"expected_{side}"].split()[0].rstrip(",;:")


@click.command()
@click.option("--good", required=True, help="an older commit (with --fixed: where the bug is still present)")
@click.option("--bad", required=True, help="a newer commit (with --fixed: where it is fixed)")
@click.option("--check", "check_id", default=None, help="the check whose verdict is the oracle (or --entry)")
@click.option("--type", "types", default="turbo3", show_default=True, type=TYPES, help="turbo types, comma separated")
@click.option("--routes", default=None, type=ROUTES, help="only these quantise routes, comma separated")
@click.option("--entry", default=None, help="take the check, types and options (MODEL pairs, env) from this catalogue entry")
@click.option("--fixed", is_flag=True, help="find the first commit where the check passes (a fix) instead of the first that fails")
@click.option("--fork-dir", default=None, type=existing_dir())
def bisect(good, bad, check_id, types, routes, entry, fixed, fork_dir):
    """Drive `git bisect run` with the check's verdict as the oracle; print the commit where it changes,
    the number of builds and the wall time. A crash of the fork's code counts as flagged (FAIL)."""
    fork = history_dir(fork_dir)
    g, b = resolve(fork, good), resolve(fork, bad)
    if entry:
        e = _entry(entry)
        check_id, types = check_id or e["check"], ",".join(e["types"])
        routes = routes or (",".join(e["routes"]) if e.get("routes") else None)
    if not check_id:
        raise HarnessError("bisect needs --check ID or --entry CATALOGUE_ID")
    _checks(check_id, "--check")
    _types(types)

    def oracle_for(logf):
        cmd = [sys.executable, "-m", "harness.cli", "bisect-oracle", "--check", check_id, "--type", types, "--log", str(logf)]
        return cmd + (["--routes", routes] if routes else []) + (["--entry", entry] if entry else []) + \
            (["--fixed"] if fixed else [])
    res = run_bisect(fork, g, b, oracle_for, fixed)
    word, subj, by, steps = "fixed" if fixed else "bad", res["subject"], res["steps"], res["evaluated"]
    parent, first, logf = res["parent"], res["first"], res["log"]
    click.echo(f"first {word} commit: {subj}")
    for c, name in ((parent, "parent"), (first, word)):
        s = by.get(c, {})
        click.echo(f"  {name:7s} {c[:10]} {check_id} {types}: {s.get('verdict', '?'):8s} {s.get('evidence', '')}")
        if s.get("report"):
            click.echo(f"          report {s['report']}")
    builds = sum(1 for s in steps if s.get("built"))
    click.echo(f"{len(steps)} commits evaluated, {builds} builds compiled, {len(steps) - builds} reused from the cache, "
               f"{res['seconds']:.0f} s wall time; oracle log {logf}")


@click.command("bisect-oracle", hidden=True)
@click.option("--check", "check_id", required=True)
@click.option("--type", "types", required=True, type=TYPES)
@click.option("--routes", default=None, type=ROUTES)
@click.option("--fixed", is_flag=True)
@click.option("--log", "log_path", required=True, type=click.Path(dir_okay=False))
@click.option("--entry", default=None)
@click.option("--commit", default=None, help="evaluate this commit instead of BISECT_HEAD (no exit-code mapping)")
def bisect_oracle(check_id, types, routes, fixed, log_path, entry, commit):
    """git-bisect-run oracle: exit 0 for the old term, 1 for the new term, 125 to skip (no build, ERROR).
    A crash of the fork's code is FAIL (flagged); a hang or a harness failure is ERROR (skipped)."""
    fork = history_dir()
    rev = commit or bisect_head()
    e = _entry(entry) if entry else {}
    t0 = time.time()
    try:
        run, run_dir, built = replay_commit(fork, rev, [check_id.upper()], _types(types),
                                            routes.split(",") if routes else None, log=lambda s: None,
                                            options=entry_options(e) if e else None, sanitize=e.get("sanitize"),
                                            prefer=_prefer(e) if e else None)
        v, ev = judge_side(run.checks[0], run.meta.get("sanitizer_reports"))
        rec = {"commit": resolve(fork, rev), "verdict": v, "built": built, "evidence": ev[:200], "report": str(run_dir),
               "seconds": round(time.time() - t0, 1)}
    except HarnessError as e:
        v, rec = "ERROR", {"commit": rev, "verdict": "ERROR", "built": True, "evidence": str(e)[:200]}
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if commit:
        sys.exit(0)
    if v in ("ERROR", "SKIP"):
        sys.exit(125)
    flagged = v in ("FAIL", "PARTIAL")
    # default terms: good (0) = passes, bad (1) = flagged; --fixed: broken/old (0) = flagged, fixed/new (1) = passes
    sys.exit((0 if flagged else 1) if fixed else (1 if flagged else 0))

