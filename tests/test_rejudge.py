"""Issue 22, groups 1 and 3: a report is re-judged from its evidence, and `report` exits as verify would.

Each test failed on the code before the fix: an edited run.json rendered PASS and exited 0 (also with --strict),
`report` exited 0 on FAIL / INTERRUPTED runs, a read-only folder gave a traceback, a corrupt run.json in --out
named no fix.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Cell, CheckResult, Run, Verdict
from harness.report.render import write_all
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks


def _pq5_run(tmp_path):
    """The CPU sample's shape: PQ5 turbo4 at 1.945 against 1.05 (FAIL on the target path), one PASS cell."""
    run = Run(run_id="r", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("PQ5", "Distortion", [
        Cell("PQ5", "turbo3", "cpu:set_rows", "nmse_over_lloyd_max", 1.01, 1.05, Verdict.PASS),
        Cell("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max", 1.945, 1.05, Verdict.FAIL, caveat="NMSE above")]))
    d = tmp_path / "run"
    write_all(run, d)
    return d


def _edit_to_pass(d):
    data = json.loads((d / "run.json").read_text())
    data["verdict"] = data["checks_verdict"] = "PASS"
    for c in data["checks"]:
        c["verdict"] = "PASS"
        for x in c["cells"]:
            x["verdict"] = "PASS"
    (d / "run.json").write_text(json.dumps(data))


@pytest.mark.parametrize("extra", [[], ["--strict"]])
def test_edited_verdicts_are_rejudged_from_value_threshold_and_op(tmp_path, extra):
    """1: verdict strings edited to PASS: report re-judges the cell (1.945 not <= 1.05), says so in one line, renders
    FAIL in summary.md, report.html and junit.xml, and exits 1 (also with --strict)."""
    d = _pq5_run(tmp_path)
    _edit_to_pass(d)
    r = CliRunner().invoke(cli, ["report", str(d), *extra])
    assert r.exit_code == 1, r.output
    assert "cell verdicts were edited or rules changed: re-judged 1 cell" in r.stderr
    assert (d / "summary.md").read_text().splitlines()[0].endswith("**FAIL**")
    assert json.loads((d / "run.json").read_text())["verdict"] == "FAIL"
    assert ET.parse(d / "junit.xml").getroot().iter("failure").__next__() is not None
    assert "FAIL" in (d / "report.html").read_text()


def test_edited_verdicts_are_rejudged_under_known_too(tmp_path):
    """1 (--known): the gate judges the re-judged cells: an edited PASS that is a new FAIL fails the gate."""
    d = _pq5_run(tmp_path)
    _edit_to_pass(d)
    known = tmp_path / "known.toml"
    known.write_text('[[finding]]\ncheck = "PQ2"\ntype = "turbo4"\npath = "cpu:*"\nmetric = "m"\nreason = "r"\n')
    r = CliRunner().invoke(cli, ["report", str(d), "--known", str(known)])
    assert r.exit_code == 1 and "re-judged 1 cell" in r.stderr, r.output


def test_unedited_runs_are_not_rejudged(tmp_path):
    """1 (no false alarm): runs straight from the checks, with faults that give FAIL and PARTIAL cells, re-judge
    to the same verdicts: the stored rules (threshold, op, recorded limits) are the ones the checks applied."""
    from harness.report.rejudge import rejudge
    for faults, checks, t in [([], ["PQ1", "PQ2", "PQ3", "PQ4", "PQ5"], "turbo3"),
                              (["perturbed_centroids"], ["PQ2", "PQ5"], "turbo4"),
                              (["uncorrected_norm"], ["PQ3"], "turbo3"), (["dense_rotation"], ["PQ1"], "turbo3")]:
        run = run_checks(NumpyTarget(faults=faults), checks, [t], tmp_path / "_".join(faults or ["clean"]),
                         log=lambda s: None)
        assert rejudge(run) == [], faults


@pytest.mark.parametrize("verdict,interrupted,code", [
    (Verdict.FAIL, None, 1), (Verdict.ERROR, None, 2), (Verdict.PASS, None, 0),
    (Verdict.PASS, {"signal": "SIGINT", "exit_code": 130, "in_progress": "PQ1", "not_run": ["PQ1"]}, 130),
    (Verdict.PASS, {"signal": "SIGTERM", "exit_code": 143, "in_progress": None, "not_run": ["PQ6"]}, 143)])
def test_report_exits_as_verify_would(tmp_path, verdict, interrupted, code):
    """3.1: `report` exits 0/1/2/130/143 by the run it reads, without --strict or --known (it exited 0 on FAIL and
    INTERRUPTED runs)."""
    run = Run(run_id="r", interrupted=interrupted)
    run.checks.append(CheckResult("PQ4", "x", [
        Cell("PQ4", "turbo3", "cpu:set_rows", "m", None, None, verdict, caveat="x")]))
    write_all(run, tmp_path / "r")
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "r")])
    assert r.exit_code == code, r.output
    assert r.exit_code == run.exit_code()


def test_report_on_an_unwritable_folder_is_one_line(tmp_path):
    """3.2: a folder where the reports cannot be written: one line naming it and the fix, no traceback."""
    d = _pq5_run(tmp_path)
    if os.geteuid() == 0:  # root writes anywhere: make one report path unwritable instead
        (d / "summary.md").unlink()
        (d / "summary.md").mkdir()
    else:
        os.chmod(d, 0o555)
    try:
        r = CliRunner().invoke(cli, ["report", str(d)])
    finally:
        os.chmod(d, 0o755)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "cannot write the reports" in lines[0] and "copy the folder" in lines[0]


def test_corrupt_run_json_in_out_names_the_fix(tmp_path):
    """3.3: a folder whose run.json is not a report, given as --out: one line that says it is left alone and
    what to do (it named only the JSON error)."""
    d = tmp_path / "r"
    d.mkdir()
    (d / "run.json").write_text('{"schema": "turbo-harness/run", "checks": [')
    r = CliRunner().invoke(cli, ["check", "PQ4", "--numpy-target", "", "--type", "turbo3", "--out", str(d)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "give a new --out folder" in lines[0] and "left as it is" in lines[0]
    assert (d / "run.json").read_text().endswith("[")


def test_build_given_a_folder_points_the_right_way(tmp_path):
    """3.3: `--build /some/folder` says --build takes a backend name and how to use a folder elsewhere (it
    suggested BACKEND=/some/folder)."""
    b = tmp_path / "builds" / "cpu"
    b.mkdir(parents=True)
    r = CliRunner().invoke(cli, ["verify", "--build", str(b)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "BACKEND=" not in lines[0] and f"TURBO_BUILD_ROOT={b.parent}" in lines[0] and "--build cpu" in lines[0]


def test_sample_reports_are_not_rejudged():
    """1 (no false alarm on real reports): every sample report the CLI wrote (verify, KVREAL, sweeps on CPU and
    CUDA, RPC, replays) re-judges to the verdicts it stores, 'nothing judged' SKIPs and listed noise floors included."""
    from pathlib import Path

    from harness.report.rejudge import rejudge
    samples = sorted((Path(__file__).resolve().parents[1] / "reports" / "samples").rglob("run.json"))
    assert len(samples) >= 10
    for p in samples:
        assert rejudge(Run.from_dict(json.loads(p.read_text()))) == [], p


def test_a_value_stored_as_text_is_one_line_not_a_traceback(tmp_path):
    """An edited run.json whose value is the string "1.945" (verdict PASS): before, formatting the re-judging note
    raised ValueError out of `report` as a traceback. The cell's value is not a number: the report is not readable,
    one line naming the field, exit 2 (never taken as PASS)."""
    d = _pq5_run(tmp_path)
    _edit_to_pass(d)
    data = json.loads((d / "run.json").read_text())
    data["checks"][0]["cells"][1]["value"] = "1.945"
    (d / "run.json").write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["report", str(d)], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "field 'value' is str" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_not_applicable_cannot_hide_judged_cells(tmp_path):
    """A check marked not applicable (no fork source) is left out of the run's verdict only while it judged nothing:
    'not_applicable' edited onto a check with a FAIL cell must not turn the run's headline PASS (the exit code
    already said 1: headline and exit code disagreed)."""
    d = _pq5_run(tmp_path)
    data = json.loads((d / "run.json").read_text())
    data["checks"][0]["not_applicable"] = "this target has no fork source to read"
    (d / "run.json").write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["report", str(d)], catch_exceptions=False)
    assert r.exit_code == 1, r.output
    assert "FAIL" in (d / "summary.md").read_text().splitlines()[0] + r.output
    run = Run.from_dict(json.loads((d / "run.json").read_text()))
    assert run.verdict == Verdict.FAIL
    # a check that judged nothing (the real case) stays out of the verdict
    run.checks.append(CheckResult("AUDIT", "Source audit", [], not_applicable="no fork source"))
    run.checks = [run.checks[-1]] + [CheckResult("PQ1", "x", [Cell("PQ1", "turbo3", "cpu:set_rows", "m", 0.0, 1.0,
                                                                  Verdict.PASS)])]
    assert run.verdict == Verdict.PASS


def test_a_pass_with_no_measured_value_is_not_taken_on_trust(tmp_path):
    """A crash cell (FAIL, no value: nothing to re-judge by number) edited to PASS rendered PASS and exited 0.
    Nothing measured is never PASS: such a cell is re-judged SKIP with the reason, and the run is no longer PASS."""
    run = Run(run_id="r", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("PQ1", "Rotation", [
        Cell("PQ1", "turbo3", "cpu:set_rows", "real_index_mismatch_frac", 0.0, 1e-6, Verdict.PASS),
        Cell("PQ1", "turbo4", "cpu:set_rows", "-", None, None, Verdict.FAIL, caveat="fork code crashed (signal 11)")]))
    d = tmp_path / "run"
    write_all(run, d)
    _edit_to_pass(d)
    r = CliRunner().invoke(cli, ["report", str(d)], catch_exceptions=False)
    assert "re-judged 1 cell" in r.output, r.output
    again = Run.from_dict(json.loads((d / "run.json").read_text()))
    assert again.verdict != Verdict.PASS
    cell = again.checks[0].cells[1]
    assert cell.verdict == Verdict.SKIP and "no measured value" in cell.caveat


@pytest.mark.parametrize("field,bad", [("details", ["x"]), ("value", [1.0]), ("caveat", 3), ("evidence", "a.npz"),
                                        ("path", None), ("known", "xfail"), ("threshold", "abc")])
def test_a_cell_of_the_wrong_shape_is_one_line_not_a_traceback(tmp_path, field, bad):
    """An edited run.json whose cell holds a field of the wrong JSON type: `report` and `diff` stopped with an
    AttributeError traceback (details a list: 'list' object has no attribute 'get'). One line naming the file and
    the cell, exit 2."""
    d = _pq5_run(tmp_path)
    data = json.loads((d / "run.json").read_text())
    data["checks"][0]["cells"][1][field] = bad
    (d / "run.json").write_text(json.dumps(data))
    for args in (["report", str(d)], ["diff", str(d), str(d), "--out", str(tmp_path / "o")]):
        r = CliRunner().invoke(cli, args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output)
        assert "run.json" in lines[0] and field in lines[0], lines
