"""Known-findings files a new user might write wrongly (found by trying them on a stored run).

Before the fix: ``accepted = nan`` or ``slack = nan`` made every grown finding XFAIL (NaN compares false), so the
gate passed however far the value grew; ``slack = -1`` and ``verdict = "PASS"`` were taken silently although the
error text says verdict must be PARTIAL, FAIL or ERROR; ``paths = "cpu:*"`` (a string, not a list) was read
character by character, so its '*' accepted findings on every path (metal-src included).
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Cell, CheckResult, Run, Verdict
from harness.report.render import write_all

_ENTRY = ('[[finding]]\ncheck = "PQ2"\ntype = "turbo4"\nmetric = "distortion_ratio_vs_lloyd_max"\n'
          'reason = "accepted codebook finding"\n')


def _run(tmp_path):
    """PQ2 turbo4 distortion 3.0 (grown beyond an accepted 2.089) on cpu, and a PARTIAL on a metal-src path."""
    run = Run(run_id="r", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("PQ2", "Codebook", [
        Cell("PQ2", "turbo4", "cpu:set_rows", "distortion_ratio_vs_lloyd_max", 3.0, 1.01, Verdict.PARTIAL),
        Cell("PQ2", "turbo4", "metal-src:set_rows", "distortion_ratio_vs_lloyd_max", 2.089, 1.01, Verdict.PARTIAL,
             target=False)]))
    d = tmp_path / "run"
    write_all(run, d)
    return d


def _report(tmp_path, extra: str):
    d = _run(tmp_path)
    known = tmp_path / "known.toml"
    known.write_text(_ENTRY + extra)
    r = CliRunner().invoke(cli, ["report", str(d), "--known", str(known)], catch_exceptions=False)
    return r, [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("extra,word", [
    ('paths = ["*"]\nverdict = "PARTIAL"\naccepted = nan\n', "accepted"),
    ('paths = ["*"]\nverdict = "PARTIAL"\naccepted = inf\n', "accepted"),
    ('paths = ["*"]\nverdict = "PARTIAL"\naccepted = 2.089\nslack = nan\n', "slack"),
    ('paths = ["*"]\nverdict = "PARTIAL"\naccepted = 2.089\nslack = -1\n', "slack"),
    ('paths = ["*"]\nverdict = "PASS"\naccepted = 2.089\n', "verdict"),
    ('paths = ["*"]\nverdict = "SKIP"\naccepted = 2.089\n', "verdict"),
    ('paths = [1, 2]\nverdict = "PARTIAL"\n', "paths"),
])
def test_a_bad_entry_is_one_line_exit_2(tmp_path, extra, word):
    r, lines = _report(tmp_path, extra)
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "[[finding]] #1" in lines[0] and word in lines[0], lines


def test_paths_as_a_string_is_one_pattern_not_its_characters(tmp_path):
    """paths = "cpu:*": one pattern; the metal-src PARTIAL stays a new finding and the gate fails (exit 1)."""
    r, _ = _report(tmp_path, 'paths = "cpu:*"\nverdict = "PARTIAL"\naccepted = 3.0\n')
    assert r.exit_code == 1, r.output
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "XFAIL" in summary and "metal-src" in summary


def test_a_good_entry_still_gates(tmp_path):
    """The same file with sane numbers: cpu's 3.0 is GROWN beyond 2.089 (exit 1); accepted at 3.0 on every path it
    is XFAIL and the gate passes (exit 0)."""
    r, _ = _report(tmp_path, 'paths = ["*"]\nverdict = "PARTIAL"\naccepted = 2.089\n')
    assert r.exit_code == 1, r.output
    r, _ = _report(tmp_path, 'paths = ["*"]\nverdict = "PARTIAL"\naccepted = 3.0\n')
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("check", ["PQ9", "pq22", "SWEEPS"])
def test_an_entry_for_a_check_that_does_not_exist_is_refused(tmp_path, check):
    """check = "PQ9" (a typo) can never match a cell: it was silently 'not checked'. One line naming the ids."""
    d = _run(tmp_path)
    known = tmp_path / "known.toml"
    known.write_text(_ENTRY.replace('"PQ2"', f'"{check}"') + 'paths = ["*"]\n')
    r = CliRunner().invoke(cli, ["report", str(d), "--known", str(known)], catch_exceptions=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and check in lines[0] and "SWEEP" in lines[0] and "PQ1" in lines[0], lines


def test_an_entry_for_the_sweep_or_an_opt_in_check_is_fine(tmp_path):
    d = _run(tmp_path)
    for check in ("SWEEP", "KVREAL", "MODEL"):
        known = tmp_path / f"{check}.toml"
        known.write_text(_ENTRY.replace('"PQ2"', f'"{check}"') + 'paths = ["*"]\n')
        r = CliRunner().invoke(cli, ["report", str(d), "--known", str(known)], catch_exceptions=False)
        assert r.exit_code == 1, r.output  # the two PQ2 PARTIALs are new findings
