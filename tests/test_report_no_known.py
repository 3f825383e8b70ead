"""`report DIR` after `report DIR --known F`: the stored gate is named, and `--no-known` drops it.

Tryout: once a folder was gated with --known, every later plain `report DIR` applied that gate again, silently, with
no way back short of editing run.json. Now a plain `report` says in one line which stored gate it applies and how to
drop it; `report DIR --no-known` drops it (the run is judged by its own verdicts again, and later plain `report`s too).
"""
from __future__ import annotations

import json

from click.testing import CliRunner

from harness.cli import cli
from tests.test_unmeasured_gate import _folder


def _report(d, *extra):
    r = CliRunner().invoke(cli, ["report", str(d), *extra], catch_exceptions=False)
    return r, [ln for ln in r.stdout.splitlines() if not ln.startswith("wrote ")]


def test_no_known_drops_the_stored_gate(tmp_path):
    d, known = _folder(tmp_path)  # PQ5 FAIL and PQ2 PARTIAL, both listed in the known-findings file
    r, head = _report(d, "--known", str(known))
    assert r.exit_code == 0 and head[0].startswith("known-findings gate PASS"), r.output
    r, head = _report(d)  # the stored gate applies, and the command says so
    assert r.exit_code == 0 and head[0].startswith("known-findings gate PASS"), r.output
    assert "known-findings gate stored in run.json" in r.stderr and "--no-known" in r.stderr, r.stderr
    r, head = _report(d, "--no-known")
    assert r.exit_code == 1 and head[0].startswith("FAIL: 1 failing, 1 partial"), r.output
    assert "known" not in json.loads((d / "run.json").read_text())["sections"]
    assert 'type="xfail"' not in (d / "junit.xml").read_text()
    r, head = _report(d)  # dropped for good
    assert r.exit_code == 1 and head[0].startswith("FAIL") and "stored" not in r.stderr, r.output


def test_known_and_no_known_together_is_one_line(tmp_path):
    d, known = _folder(tmp_path)
    r = CliRunner().invoke(cli, ["report", str(d), "--known", str(known), "--no-known"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--no-known" in r.output, r.output
