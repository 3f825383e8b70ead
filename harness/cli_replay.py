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

from harness.errors import HarnessError
from harness.fork import build as fb
from harness.reference.turbo import TURBO_TYPES
from harness.replay import build_commit, cache_root, git_dir_of, load_catalogue, resolve

REPORTS = Path(os.environ.get("TURBO_REPORTS", fb.REPO_ROOT / "reports"))


def _checks(value: str | None) -> list[str]:
    from harness.verify import all_checks
    ids = [c.strip().upper() for c in value.split(",")] if value else [c for c in all_checks() if c != "COMPAT"]
    bad = [c for c in ids if c not in all_checks()]
    if bad:
        raise HarnessError(f"unknown check {', '.join(bad)}: choose from {', '.join(all_checks())}")
    return ids


def _types(value: str) -> list[str]:
    ts = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in ts if t not in TURBO_TYPES]
    if bad:
        raise HarnessError(f"unknown turbo type {', '.join(bad)}: choose from {', '.join(TURBO_TYPES)}")
    return ts


def replay_commit(fork: Path, rev: str, checks: list[str], types: list[str], routes: list[str] | None,
                  out: Path | None = None, log=click.echo, label: str = ""):
    """Build ``rev`` (cached), run the checks on its CPU backend, write a report labelled with the commit.

    Returns (run, run_dir, built: bool - whether this call compiled anything new).
    """
    from harness.targets.fork import ForkTarget
    from harness.verify import run_checks
    commit = resolve(fork, rev)
    had = (cache_root() / "build" / commit / fb.BUILD_META).is_file()
    src, bdir, meta = build_commit(fork, commit, log=log)
    run_dir = out or REPORTS / f"replay-{commit[:10]}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = ForkTarget(bdir, src)
    try:
        meta = dict(meta, fork_commit=commit, fork_dir=str(src), build_dir=str(bdir), replay_of=commit,
                    replay_label=label, fork_describe=subprocess.run(
                        ["git", "--git-dir", str(git_dir_of(fork)), "log", "-1", "--format=%h %s", commit],
                        capture_output=True, text=True).stdout.strip())
        run = run_checks(target, checks, types, run_dir, target_backend="cpu", meta=meta, log=log, routes=routes)
    finally:
        target.close()
    return run, run_dir, not had


@click.command()
@click.argument("commit")
@click.option("--checks", "check_list", default=None, help="comma-separated check ids (default PQ1-PQ6)")
@click.option("--type", "types", default=",".join(TURBO_TYPES), show_default=True)
@click.option("--routes", default=None, help="only these quantise routes, e.g. quantize_chunk")
@click.option("--fork-dir", default=None, help="fork checkout with history (default $FORK_DIR or vendor/llama.cpp)")
@click.option("--out", default=None)
@click.option("--strict", is_flag=True)
def replay(commit, check_list, types, routes, fork_dir, out, strict):
    """Build the fork at COMMIT (cached under .cache/replay) and run the checks on it."""
    fork = fb.fork_dir(fork_dir)
    run, run_dir, built = replay_commit(fork, commit, _checks(check_list), _types(types),
                                        routes.split(",") if routes else None, Path(out) if out else None)
    click.echo(f"{run.meta['fork_commit'][:12]}: {run.verdict.value}; report {run_dir / 'summary.md'}")
    sys.exit(run.exit_code(strict))


@click.command()
@click.argument("ids", nargs=-1)
@click.option("--fork-dir", default=None)
def catalogue(ids, fork_dir):
    """Replay catalogue entries (checks/replays.toml) at parent and fix; print both verdict rows.

    Without IDS, the entries marked status = "replayed"; exit 1 when a verdict differs from the catalogue."""
    fork = fb.fork_dir(fork_dir)
    entries = [e for e in load_catalogue() if (e["id"] in ids if ids else e.get("status") == "replayed")]
    if ids and len(entries) != len(set(ids)):
        raise HarnessError(f"unknown catalogue id among {', '.join(ids)}; known: {', '.join(e['id'] for e in load_catalogue())}")
    ok_all = True
    for e in entries:
        for side in ("parent", "fix"):
            rev = e.get(f"replay_{side}", e[side])
            try:
                run, run_dir, _ = replay_commit(fork, rev, [e["check"]], e["types"], e.get("routes"),
                                                label=f"{e['id']} {side}", log=lambda s: None)
                v = run.checks[0].verdict.value
                worst = [c for c in run.checks[0].cells if c.verdict.value == v][:1]
                why = worst[0].caveat if worst else ""
            except HarnessError as err:
                v, run_dir, why = "ERROR", None, str(err)
            exp = e[f"expected_{side}"].split()[0]
            match = v == exp or (side == "parent" and exp in ("FAIL", "PARTIAL") and v in ("FAIL", "PARTIAL"))
            ok_all &= match
            click.echo(f"{e['id']:28s} {side:6s} {rev[:10]} {e['check']} {','.join(e['types']):14s} "
                       f"{v:8s} (expected {exp}) {'ok' if match else 'MISMATCH'}  {why[:100]}")
            if run_dir:
                click.echo(f"{'':36s} report {run_dir / 'summary.md'}")
    sys.exit(0 if ok_all else 1)


@click.command()
@click.option("--good", required=True, help="an older commit (with --fixed: where the bug is still present)")
@click.option("--bad", required=True, help="a newer commit (with --fixed: where it is fixed)")
@click.option("--check", "check_id", required=True)
@click.option("--type", "types", default="turbo3", show_default=True)
@click.option("--routes", default=None)
@click.option("--fixed", is_flag=True, help="find the first commit where the check passes (a fix) instead of the first that fails")
@click.option("--fork-dir", default=None)
def bisect(good, bad, check_id, types, routes, fixed, fork_dir):
    """Drive `git bisect run` with the check's verdict as the oracle; print the commit where it changes."""
    fork = fb.fork_dir(fork_dir)
    gd = git_dir_of(fork)
    g, b = resolve(fork, good), resolve(fork, bad)
    _checks(check_id)
    _types(types)
    work = cache_root() / "bisect"
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo.git"
    if not repo.is_dir():
        subprocess.run(["git", "clone", "-q", "--bare", "--shared", str(gd), str(repo)], check=True)
    env = dict(os.environ, GIT_DIR=str(repo), FORK_DIR=str(fork), PYTHONPATH=str(fb.REPO_ROOT))
    logf = work / f"oracle-{int(time.time())}.jsonl"
    git = ["git", "--git-dir", str(repo)]
    subprocess.run(git + ["bisect", "reset"], capture_output=True, env=env)
    terms = ["--term-old=broken", "--term-new=fixed"] if fixed else []
    r = subprocess.run(git + ["bisect", "start", "--no-checkout", *terms, b, g], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise HarnessError(f"git bisect start failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout}")
    oracle = [sys.executable, "-m", "harness.cli", "bisect-oracle", "--check", check_id, "--type", types, "--log", str(logf)]
    if routes:
        oracle += ["--routes", routes]
    if fixed:
        oracle.append("--fixed")
    t0 = time.time()
    r = subprocess.run(git + ["bisect", "run", *oracle], capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    subprocess.run(git + ["bisect", "reset"], capture_output=True, env=env)
    word = "fixed" if fixed else "bad"
    first = next((ln.split()[0] for ln in out.splitlines() if f"is the first {word} commit" in ln), None)
    steps = [json.loads(ln) for ln in logf.read_text().splitlines()] if logf.is_file() else []
    if not first:
        tail = [ln for ln in out.splitlines() if ln.strip()][-3:]
        raise HarnessError(f"bisect did not converge: {' / '.join(tail)} (oracle log {logf})")
    by = {s["commit"]: s for s in steps}
    parent = subprocess.run(["git", "--git-dir", str(gd), "rev-parse", f"{first}^"], capture_output=True, text=True).stdout.strip()
    if parent not in by:  # evidence at the parent too
        subprocess.run([*oracle, "--commit", parent], capture_output=True, text=True, env=env)
        steps = [json.loads(ln) for ln in logf.read_text().splitlines()]
        by = {s["commit"]: s for s in steps}
    subj = subprocess.run(["git", "--git-dir", str(gd), "log", "-1", "--format=%h %s", first], capture_output=True, text=True).stdout.strip()
    click.echo(f"first {word} commit: {subj}")
    for c, name in ((parent, "parent"), (first, word)):
        s = by.get(c, {})
        click.echo(f"  {name:7s} {c[:10]} {check_id} {types}: {s.get('verdict', '?'):8s} {s.get('evidence', '')}")
        if s.get("report"):
            click.echo(f"          report {s['report']}")
    builds = sum(1 for s in steps if s.get("built"))
    click.echo(f"{len(steps)} commits evaluated, {builds} new builds, {time.time() - t0:.0f} s; oracle log {logf}")


@click.command("bisect-oracle", hidden=True)
@click.option("--check", "check_id", required=True)
@click.option("--type", "types", required=True)
@click.option("--routes", default=None)
@click.option("--fixed", is_flag=True)
@click.option("--log", "log_path", required=True)
@click.option("--commit", default=None, help="evaluate this commit instead of BISECT_HEAD (no exit-code mapping)")
def bisect_oracle(check_id, types, routes, fixed, log_path, commit):
    """git-bisect-run oracle: exit 0 for the old term, 1 for the new term, 125 to skip (no build, ERROR)."""
    fork = fb.fork_dir()
    rev = commit or subprocess.run(["git", "rev-parse", "BISECT_HEAD"], capture_output=True, text=True).stdout.strip()
    try:
        run, run_dir, built = replay_commit(fork, rev, [check_id.upper()], _types(types),
                                            routes.split(",") if routes else None, log=lambda s: None)
        v = run.checks[0].verdict.value
        bad_cells = [c for c in run.checks[0].cells if c.verdict.value in ("FAIL", "PARTIAL", "ERROR")]
        ev = f"{bad_cells[0].path} {bad_cells[0].metric}={bad_cells[0].value} ({bad_cells[0].caveat[:90]})" if bad_cells else \
            "all cells within thresholds"
        rec = {"commit": resolve(fork, rev), "verdict": v, "built": built, "evidence": ev, "report": str(run_dir)}
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


commands = [replay, catalogue, bisect, bisect_oracle]
