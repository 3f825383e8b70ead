"""A run that never finished (killed with SIGKILL, out of memory, crashed) never reads as PASS.

Tryout (fork 69d8e4be4): `verify --checks PQ1,PQ3,PQ5 --out D & sleep 1.3; kill -9 $!` then `report D` printed
"PASS: every judged cell passed", exit 0, and junit.xml had only passing tests: the report rewritten after PQ1
carried nothing saying the run was still going, and PQ3 and PQ5 (PQ5 FAILs on that fork) never ran. Now the report
says RUNNING from the start (the checks asked, those not run yet), the final write clears it, and a report still
marked running whose folder no live process holds is shown as INTERRUPTED with the checks not run (exit 130).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from tests.test_sweep_integrity import fake  # noqa: F401  (the fake fork tools fixture)

ROOT = Path(__file__).resolve().parents[1]
ASKED = ["PQ4", "PQ1", "PQ3"]  # PQ4 is quick; PQ1 then takes seconds on the slowed NumPy target


def _verify(out: Path, checks=ASKED) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "verify", "--numpy-target", "slow", "--type", "turbo3",
                             "--checks", ",".join(checks), "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after_first_check(out: Path) -> str:
    """Start verify, SIGKILL it once PQ4's report is written (PQ1 running); returns what it printed."""
    p = _verify(out)
    lines, deadline = [], time.time() + 120
    try:
        for ln in p.stdout:
            lines.append(ln)
            if ln.startswith("PQ4 ") or time.time() > deadline:
                break
        while time.time() < deadline:  # PQ4's reports are written (junit.xml names PQ4)
            if (out / "junit.xml").is_file() and 'name="PQ4"' in (out / "junit.xml").read_text():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert any(ln.startswith("PQ4 ") for ln in lines), "".join(lines)
    return "".join(lines)


def test_killed_verify_is_never_a_pass(tmp_path):
    out = tmp_path / "r"
    _kill_after_first_check(out)
    # what the killed run left: it says it was still running, with the checks not run yet
    data = json.loads((out / "run.json").read_text())
    assert data["verdict"] == "RUNNING", data["verdict"]
    assert data["interrupted"]["state"] == "running" and data["interrupted"]["not_run"] == ["PQ1", "PQ3"]
    assert "PASS" not in (out / "summary.md").read_text().splitlines()[0]
    junit = (out / "junit.xml").read_text()
    assert "PQ1 not run" in junit and "PQ3 not run" in junit and "<error" in junit

    r = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert r.exit_code == 130, r.output
    head = [ln for ln in r.stdout.splitlines() if not ln.startswith("wrote ")][0]
    assert head.startswith("INTERRUPTED") and "not run: PQ1, PQ3" in head, head
    assert "did not finish" in r.stderr  # the one line that says why it is shown as interrupted
    data = json.loads((out / "run.json").read_text())
    assert data["verdict"] == "INTERRUPTED" and data["interrupted"]["state"] == "unfinished"
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0].endswith("**INTERRUPTED**") and "not run: PQ1, PQ3" in summary
    junit = (out / "junit.xml").read_text()
    assert 'name="INTERRUPTED"' in junit and "PQ1 not run" in junit and "PQ3 not run" in junit
    assert "<title>turbo-harness r: INTERRUPTED</title>" in (out / "report.html").read_text()
    # the same again (the marking is stored now), and with a known-findings gate: still interrupted
    assert CliRunner().invoke(cli, ["report", str(out)]).exit_code == 130

    # resuming finishes it: the marking is gone, the verdict is the checks' own
    p = _verify(out, ["PQ1", "PQ3"])
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 0, text
    data = json.loads((out / "run.json").read_text())
    assert data["interrupted"] is None and data["verdict"] == "PASS"
    assert {c["id"] for c in data["checks"]} == set(ASKED)
    assert CliRunner().invoke(cli, ["report", str(out)]).exit_code == 0


def test_a_live_run_is_shown_running_not_interrupted(tmp_path):
    """While the writer holds the folder, readers see RUNNING (never PASS, never a stale INTERRUPTED) and `report`
    stops at the lock; the finished run clears the marking."""
    from harness.pipeline import load_run
    out = tmp_path / "r"
    p = _verify(out, ["PQ4", "PQ1", "PQ3", "PQ5"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if "PQ4" in [c["id"] for c in json.loads((out / "run.json").read_text())["checks"]]:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        run = load_run(out)
        assert run.headline == "RUNNING" and run.exit_code() == 130
        assert run.interrupted["not_run"][:1] == ["PQ1"]
        r = CliRunner().invoke(cli, ["report", str(out)])
        assert r.exit_code == 2 and "being written by another turbo-harness run" in r.output
        text, _ = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, text
    data = json.loads((out / "run.json").read_text())
    assert data["interrupted"] is None and data["verdict"] == "PASS"


def test_killed_sweep_into_an_earlier_report_is_not_that_reports_pass(fake):
    """A sweep writes its report at its end: killed before that in a folder holding an earlier sweep's report, the
    folder showed the earlier result (exit 0) as if the new sweep had passed. Now the earlier report is marked RUNNING at the
    start, so a killed sweep reads as INTERRUPTED ("SWEEP" not run, the earlier results marked as earlier)."""
    from tests.test_sweep_integrity import _one_report
    env = dict(os.environ, PYTHONPATH=str(ROOT), TURBO_SWEEP_CACHE=str(fake.tmp / "cache"))

    def sweep(pairs):
        args = fake.cli_args(pairs, "--no-bench")
        code = ("import sys; from tests.test_sweep_parsers import TRAITS; import harness.runners.sweep as S; "
                f"S.type_traits = lambda b: TRAITS; sys.argv = ['turbo-harness', *{args!r}]; "
                "from harness.cli import main; main()")
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    (fake.d / "stdout_turbo3_turbo3").write_text((fake.d / "stdout_q8_0_q8_0").read_text())  # turbo3 as good as q8_0
    first = sweep("f16/f16,q8_0/q8_0,turbo3/turbo3")
    out = _one_report(fake.tmp)
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert first.returncode == 0 and r.exit_code == 0, r.output  # its cells pass (the pairs not compared SKIP)
    (fake.d / "ppl_turbo2_turbo2.sh").write_text("kill -KILL $PPID\nexit 1\n")  # the harness dies mid-sweep
    second = sweep("turbo2/turbo2")
    assert second.returncode == -signal.SIGKILL, second.stderr
    r = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert r.exit_code == 130, r.output
    head = [ln for ln in r.stdout.splitlines() if not ln.startswith("wrote ")][0]
    assert head.startswith("INTERRUPTED") and "not run: SWEEP" in head and "shown from the earlier run" in head, head
    assert "SKIP (earlier run, not this one)" in (out / "summary.md").read_text()  # its verdict, marked as earlier
    assert "<testcase" in (out / "junit.xml").read_text() and "SWEEP not run" in (out / "junit.xml").read_text()


def test_a_sweep_that_ends_without_its_own_report_puts_the_earlier_one_back(tmp_path):
    """mark_folder_running / unmark_folder (a sweep stopped by an error, or a signal before any job ran): the earlier
    report is RUNNING while the sweep goes, then exactly what it was."""
    from harness import runlock
    from harness.pipeline import load_run
    from harness.unfinished import mark_folder_running, unmark_folder
    from harness.report.model import Cell, CheckResult, Run, Verdict
    from harness.report.render import write_all
    run = Run(run_id="r", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("PQ5", "Distortion", [
        Cell("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max", 1.945, 1.05, Verdict.FAIL)]))
    d = tmp_path / "run"
    write_all(run, d)
    before = json.loads((d / "run.json").read_text())
    assert not mark_folder_running(tmp_path / "empty")
    runlock.acquire(d)
    try:
        assert mark_folder_running(d)
        assert json.loads((d / "run.json").read_text())["verdict"] == "RUNNING"
        unmark_folder(d)
    finally:
        runlock.release(d)
    after = json.loads((d / "run.json").read_text())
    assert after["verdict"] == before["verdict"] == "FAIL" and after["interrupted"] is None
    assert load_run(d).exit_code() == 1


def test_a_folder_a_killed_run_left_without_a_report_says_so(tmp_path):
    """tryout 28b: a sweep killed (-9) in a new folder before its first job wrote nothing but the lock file, and
    `report D` said 'run.json not found: give a run folder written by turbo-harness', as if D were the wrong folder."""
    from harness import runlock
    d = tmp_path / "killed"
    d.mkdir()
    (d / runlock.LOCK_NAME).write_text("")  # what the killed run left
    r = CliRunner().invoke(cli, ["report", str(d)])
    assert r.exit_code == 2 and "ended before it wrote any result" in r.output and "rerun the same command" in r.output
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
                               str(d / runlock.LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:  # another live process holds the folder: a run still going, not a dead one
        assert holder.stdout.readline().strip() == "held"
        assert "being written by another turbo-harness run" in CliRunner().invoke(cli, ["report", str(d)]).output
        from harness.errors import HarnessError
        from harness.pipeline import load_run
        with pytest.raises(HarnessError, match="a run is writing"):  # readers without the lock: diff, scorecard
            load_run(d)
    finally:
        holder.kill()
        holder.wait()
