"""replay / bisect: bad commits, failed builds, the catalogue, and (when builds are cached) real replays."""
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.fork import build as fb
from harness.replay import load_catalogue

ROOT = Path(__file__).resolve().parents[1]


def invoke(args, env):
    r = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    return r.exit_code, r.output


def fake_fork(tmp_path: Path) -> tuple[Path, str]:
    repo = tmp_path / "fork"
    (repo / "ggml" / "include").mkdir(parents=True)
    (repo / "ggml" / "include" / "ggml.h").write_text("GGML_TYPE_TURBO3_0\n")
    (repo / "CMakeLists.txt").write_text('cmake_minimum_required(VERSION 3.14)\nproject(x C)\nmessage(FATAL_ERROR "this commit is broken")\n')
    g = ["git", "-C", str(repo)]
    subprocess.run(g + ["init", "-q"], check=True)
    subprocess.run(g + ["add", "."], check=True)
    subprocess.run(g + ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "broken"], check=True)
    return repo, subprocess.run(g + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_unknown_commit_is_a_clear_usage_error(tmp_path):
    repo, _ = fake_fork(tmp_path)
    code, out = invoke(["replay", "0123456789abcdef"], {"FORK_DIR": str(repo), "TURBO_REPLAY_CACHE": str(tmp_path / "c")})
    assert code == 2 and "not in the fork's history" in out
    assert out.count("\n") == 1


def test_failed_build_exits_2_and_leaves_other_builds_alone(tmp_path):
    repo, commit = fake_fork(tmp_path)
    cache = tmp_path / "c"
    other = cache / ("f" * 40) / "build"
    other.mkdir(parents=True)
    (other / "marker").write_text("keep me")
    code, out = invoke(["replay", commit[:8], "--checks", "PQ4"], {"FORK_DIR": str(repo), "TURBO_REPLAY_CACHE": str(cache)})
    assert code == 2 and "does not build" in out and "configure" in out
    assert (other / "marker").read_text() == "keep me"
    assert (cache / commit / "src" / ".fork-commit").is_file()  # the exported source is cached for a retry


def test_catalogue_entries_are_complete():
    entries = load_catalogue()
    assert len(entries) >= 3
    for e in entries:
        for k in ("id", "fix", "parent", "backend", "check", "types", "expected_parent", "expected_fix", "what"):
            assert e.get(k), (e.get("id"), k)
        assert len(e["fix"]) == 40 and len(e["parent"]) == 40


def _cached(commit: str) -> bool:
    root = Path(os.environ.get("TURBO_REPLAY_CACHE") or ROOT / ".cache" / "replay")
    return any((root / commit).glob(f"build*/{fb.BUILD_META}"))


def test_replayed_bug_flagged_at_parent_clear_at_fix():
    e = next(e for e in load_catalogue() if e["id"] == "turbo3-cpu-quantize-stub")
    from harness.errors import HarnessError
    from harness.replay import history_dir
    try:  # first: without the fork's history (a snapshot has none) no command could make the builds
        fork = history_dir()
    except HarnessError as err:  # CI's snapshot has no git history: replays need a clone of the fork
        pytest.skip(f"no fork git history (replays export old commits from it): {err}")
    if not (_cached(e["parent"]) and _cached(e["fix"])):
        pytest.skip(f"replay builds not cached: `make catalogue ARGS=turbo3-cpu-quantize-stub` builds them once "
                    f"(about 10 min, from the history at {fork})")
    from harness.cli_replay import replay_commit
    verdicts = {}
    for side in ("parent", "fix"):
        run, _, built = replay_commit(fork, e[side], [e["check"]], e["types"], None, out=None, log=lambda s: None)
        assert not built
        verdicts[side] = run.checks[0].verdict.value
    assert verdicts["parent"] in ("FAIL", "PARTIAL") and verdicts["fix"] == "PASS"


@pytest.mark.parametrize("verdict,fixed,code", [
    ("PASS", False, 0), ("FAIL", False, 1), ("PARTIAL", False, 1),   # default terms: good = passes
    ("PASS", True, 1), ("FAIL", True, 0),                            # --fixed: old/broken = flagged, new/fixed = passes
    ("ERROR", False, 125), ("ERROR", True, 125),                     # could not measure: git bisect skip
])
def test_bisect_oracle_maps_lossy_verdicts_to_git_bisect_codes(monkeypatch, tmp_path, verdict, fixed, code):
    import harness.cli_replay as cr
    from harness.report.model import Cell, CheckResult, Run, Verdict

    def fake_replay(fork, rev, checks, types, routes, out=None, log=None, label="", options=None, sanitize=None,
                    prefer=None):
        run = Run(run_id="x")
        cell = Cell("PQ5", "turbo3", "cpu:set_rows", "nmse_over_lloyd_max", 1.0, 1.05, Verdict(verdict))
        run.checks.append(CheckResult(id="PQ5", title="t", cells=[cell]))
        return run, tmp_path / "r", False
    monkeypatch.setattr(cr, "replay_commit", fake_replay)
    monkeypatch.setattr(cr, "resolve", lambda fork, rev: "a" * 40)
    monkeypatch.setattr(cr, "history_dir", lambda *a: tmp_path)
    # the oracle reads BISECT_HEAD through git; answer it here
    monkeypatch.setattr(cr.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "a" * 40 + "\n"})())
    args = ["bisect-oracle", "--check", "PQ5", "--type", "turbo3", "--log", str(tmp_path / "log.jsonl")]
    args += ["--fixed"] if fixed else []
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == code
    assert '"verdict": "%s"' % verdict in (tmp_path / "log.jsonl").read_text()


def test_a_snapshot_inside_another_repository_is_not_taken_as_fork_history(tmp_path):
    """A source snapshot unpacked under the harness checkout must not borrow the harness's own git history."""
    import subprocess
    from harness.errors import HarnessError
    from harness.replay import git_dir_of
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    snap = tmp_path / ".cache" / "fork" / "llama.cpp"
    snap.mkdir(parents=True)
    with pytest.raises(HarnessError, match="not a git checkout of the fork"):
        git_dir_of(snap)
    assert git_dir_of(tmp_path) == (tmp_path / ".git").resolve()


def test_run_bisect_finds_the_first_bad_commit_with_an_oracle_and_records_the_parent(tmp_path):
    """The bisection driver (harness.replay.run_bisect, no CLI) on a small history: commit 4 of 6 introduces the
    bug; the oracle reads each commit's tree; the parent's record is added when git bisect did not visit it."""
    import json as _json
    import subprocess as sp
    import sys as _sys

    from harness.replay import run_bisect
    fork = tmp_path / "fork"
    fork.mkdir()
    git = ["git", "-C", str(fork), "-c", "user.name=t", "-c", "user.email=t@t"]
    sp.run(git + ["init", "-q"], check=True)
    commits = []
    for i in range(6):
        (fork / "state").write_text(f"{i} " + ("bug\n" if i >= 3 else "ok\n"))
        sp.run(git + ["add", "state"], check=True)
        sp.run(git + ["commit", "-q", "-m", f"c{i}"], check=True)
        commits.append(sp.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    oracle = tmp_path / "oracle.py"
    oracle.write_text(
        "import json, subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "log = args[args.index('--log') + 1]\n"
        "c = args[args.index('--commit') + 1] if '--commit' in args else "
        "subprocess.run(['git', 'rev-parse', 'BISECT_HEAD'], capture_output=True, text=True).stdout.strip()\n"
        "state = subprocess.run(['git', 'show', c + ':state'], capture_output=True, text=True).stdout\n"
        "open(log, 'a').write(json.dumps({'commit': c, 'verdict': 'FAIL' if 'bug' in state else 'PASS'}) + '\\n')\n"
        "sys.exit(0 if '--commit' in args else (1 if 'bug' in state else 0))\n")
    res = run_bisect(fork, commits[0], commits[-1], lambda log: [_sys.executable, str(oracle), "--log", str(log)],
                     work=tmp_path / "work")
    assert res["first"] == commits[3] and res["parent"] == commits[2] and res["subject"].endswith(" c3")
    assert res["steps"][commits[3]]["verdict"] == "FAIL" and res["steps"][commits[2]]["verdict"] == "PASS"
    assert [_json.loads(x)["commit"] for x in res["log"].read_text().splitlines()] == [s["commit"] for s in res["evaluated"]]


def test_replay_follows_the_run_folder_rules_of_every_checks_run(tmp_path, monkeypatch):
    """A replay's --out is prepared like verify's: a sweep report there is refused before anything is built, a checks
    report of the same build is added to, one of another build is refused and left as it was."""
    import json

    import harness.cli_replay as cr
    import harness.targets.fork as tf
    from harness.targets.numpy_target import NumpyTarget
    repo, commit = fake_fork(tmp_path)
    builds = []

    def fake_build(fork, c, targets=(), log=None, sanitize=None, prefer=None, backend="cpu", **kw):
        builds.append(c)
        bdir = tmp_path / f"build{len(builds) if len(builds) > 2 else 1}"
        return repo, bdir, {"cmake_options": ["-DX=1"], "reused": True}
    monkeypatch.setattr(cr, "build_commit", fake_build)
    monkeypatch.setattr(tf, "ForkTarget", lambda bdir, src, env=None: NumpyTarget())
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "run.json").write_text(json.dumps({"run_id": "s", "checks": [{"id": "SWEEP", "title": "t", "cells": []}]}))
    before = (sweep_dir / "run.json").read_text()
    code, out = invoke(["replay", commit, "--fork-dir", str(repo), "--checks", "PQ4", "--type", "turbo3",
                        "--out", str(sweep_dir)], {})
    assert code == 2 and "holds a sweep report" in out and not builds and (sweep_dir / "run.json").read_text() == before
    d = tmp_path / "r"
    args = ["replay", commit, "--fork-dir", str(repo), "--type", "turbo3", "--out", str(d)]
    code, out = invoke(args + ["--checks", "PQ4"], {})
    assert code == 0, out
    code, out = invoke(args + ["--checks", "PQ3"], {})  # the same build: added to the report
    assert code == 0, out
    assert [c["id"] for c in json.loads((d / "run.json").read_text())["checks"]] == ["PQ3", "PQ4"]
    kept = (d / "run.json").read_text()
    code, out = invoke(args + ["--checks", "PQ3"], {})  # another build folder: refused, the report left alone
    assert code == 2 and "holds a report of another build" in out and "differs in build_dir" in out, out
    assert (d / "run.json").read_text() == kept


def test_a_signal_during_a_replay_marks_its_partial_report_and_exits_143(tmp_path, monkeypatch):
    """replay is interruptible like verify: SIGTERM inside a check leaves the report marked INTERRUPTED, with the
    checks not run, and the exit code 143 (not a traceback, not the FAIL code)."""
    import json
    import signal

    import harness.cli_replay as cr
    import harness.targets.fork as tf
    from harness.checks.contract import Check
    from harness.checks.registry import REGISTRY
    from harness.targets.numpy_target import NumpyTarget
    repo, commit = fake_fork(tmp_path)
    monkeypatch.setattr(cr, "build_commit", lambda fork, c, **kw: (repo, tmp_path / "b", {"reused": True}))
    monkeypatch.setattr(tf, "ForkTarget", lambda bdir, src, env=None: NumpyTarget())

    def sigterm(ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        return []
    reg = REGISTRY.with_check(Check("TERM", "sends SIGTERM", sigterm, order=15))
    d = tmp_path / "r"

    def unhandled(signum, frame):  # what a replay without its own handler would meet (instead of killing pytest)
        raise RuntimeError("SIGTERM reached the test's handler: replay does not handle it")
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        r = CliRunner().invoke(cli, ["replay", commit, "--fork-dir", str(repo), "--checks", "PQ1,TERM,PQ3", "--type",
                                     "turbo3", "--out", str(d)], obj=reg)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert r.exit_code == 143, r.output
    assert "interrupted by SIGTERM" in r.output
    stored = json.loads((d / "run.json").read_text())
    assert stored["interrupted"]["not_run"] == ["TERM", "PQ3"] and [c["id"] for c in stored["checks"]] == ["PQ1"]
    assert stored["interrupted"]["in_progress"] == "TERM"


def test_replay_and_bisect_check_types_as_verify_does(tmp_path, monkeypatch):
    import harness.cli_replay as cr
    monkeypatch.setattr(cr, "history_dir", lambda *a: tmp_path)
    monkeypatch.setattr(cr, "resolve", lambda fork, rev: "a" * 40)
    for args in (["replay", "HEAD", "--type", " , "], ["bisect", "--good", "a", "--bad", "b", "--check", "PQ1", "--type", ""]):
        code, out = invoke(args, {})
        assert code == 2 and "names no turbo type" in out, (args, out)
    code, out = invoke(["replay", "HEAD", "--type", "turbo3,turbo9"], {})
    assert code == 2 and "'--type': unknown turbo type turbo9: choose from turbo2, turbo3, turbo4" in out
