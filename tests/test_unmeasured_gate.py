"""Nothing measured never passes a known-findings gate, and finding lines follow the re-judged cells.

Tryout: a run.json hand-edited so that every measured value is null. With the known-findings gate stored by an
earlier `report D --known F`, a plain `report D` still read "gate PASS", exit 0, with XFAIL lines for cells that held
no value (the stored gate and the cells' stored XFAIL marks were taken as they were, never recomputed from the
re-judged cells); without a gate, the re-judge line said "now SKIP" while the FAIL lines said "not measured" with no
word on why they stayed FAIL. Now: the stored gate is judged again on the re-judged cells; a FAIL/PARTIAL cell judged
by a number it does not hold is never XFAIL (its entry is "not checked", the cell counts as not measured and fails the
gate); a gate over a run where nothing was judged is SKIP (exit 1), never PASS; and a FAIL kept without its value says
so in its line and in the re-judge line.
"""
from __future__ import annotations

import json

from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Cell, CheckResult, Run, Verdict
from harness.report.render import write_all

KNOWN = ('[[finding]]\ncheck = "PQ5"\ntype = "turbo4"\npath = "cpu:set_rows"\nmetric = "nmse_over_lloyd_max"\n'
         'accepted = 1.945\nreason = "codebook"\n\n'
         '[[finding]]\ncheck = "PQ2"\ntype = "turbo4"\npath = "cpu:*"\nmetric = "distortion_ratio_vs_lloyd_max"\n'
         'verdict = "PARTIAL"\nreason = "codebook, any value"\n')


def _folder(tmp_path, bad: bool = True):
    run = Run(run_id="r", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("PQ1", "Rotation", [
        Cell("PQ1", "turbo3", "cpu:set_rows", "max_abs_err", 1e-7, 1e-5, Verdict.PASS)]))
    if bad:
        run.checks.append(CheckResult("PQ2", "Codebook", [
            Cell("PQ2", "turbo4", "cpu:set_rows", "distortion_ratio_vs_lloyd_max", 2.089, 1.01, Verdict.PARTIAL,
                 caveat="distortion 2.089x the Lloyd-Max optimum")]))
        run.checks.append(CheckResult("PQ5", "Distortion", [
            Cell("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max", 1.945, 1.05, Verdict.FAIL,
                 caveat="NMSE 0.01812 above TurboQuant's bound 0.01063")]))
    d = tmp_path / "run"
    write_all(run, d)
    known = tmp_path / "known.toml"
    known.write_text(KNOWN)
    return d, known


def _null_values(d):
    p = d / "run.json"
    data = json.loads(p.read_text())
    for c in data["checks"]:
        for x in c["cells"]:
            x["value"] = None
    p.write_text(json.dumps(data))


def _report(d, *extra):
    r = CliRunner().invoke(cli, ["report", str(d), *extra], catch_exceptions=False)
    return r, [ln for ln in r.stdout.splitlines() if not ln.startswith("wrote ")]


def test_a_stored_gate_is_judged_again_on_unmeasured_cells(tmp_path):
    d, known = _folder(tmp_path)
    r, head = _report(d, "--known", str(known))
    assert r.exit_code == 0 and head[0].startswith("known-findings gate PASS"), r.output  # measured: accepted
    _null_values(d)
    for extra in ([], ["--known", str(known)]):  # the gate stored in run.json, or the file given again
        r, head = _report(d, *extra)
        assert r.exit_code == 1, r.output
        assert head[0].startswith("known-findings gate FAIL") and "2 not measured" in head[0], head[0]
        assert not [ln for ln in head if ln.startswith("XFAIL")], head
        data = json.loads((d / "run.json").read_text())
        sec = data["sections"]["known"]
        assert sec["gate"] == "FAIL" and sec["counts"]["xfail"] == 0 and sec["counts"]["unmeasured"] == 2
        assert [e["status"] for e in sec["entries"]] == [{"cpu:set_rows": "not checked"}, {"cpu:*": "not checked"}]
        assert "PASS" not in (d / "summary.md").read_text().splitlines()[0]
        assert 'type="xfail"' not in (d / "junit.xml").read_text()


def test_a_gate_over_nothing_judged_is_not_pass(tmp_path):
    d, known = _folder(tmp_path, bad=False)
    r, head = _report(d, "--known", str(known))
    assert r.exit_code == 0 and head[0].startswith("known-findings gate PASS"), r.output
    _null_values(d)  # the one PASS cell holds no value: SKIP; nothing in the run is judged
    r, head = _report(d)
    assert r.exit_code == 1 and head[0].startswith("SKIP: nothing was judged (known-findings gate SKIP)"), r.output
    assert json.loads((d / "run.json").read_text())["sections"]["known"]["gate"] == "SKIP"
    assert (d / "summary.md").read_text().splitlines()[0].endswith("**SKIP (known-findings gate; nothing judged)**")


def test_finding_lines_say_a_fail_is_kept_without_its_value(tmp_path):
    d, _ = _folder(tmp_path)
    _null_values(d)
    r, head = _report(d)
    assert r.exit_code == 1, r.output
    assert "2 FAIL/PARTIAL cells hold no value: kept as stored" in r.stderr, r.stderr
    fail = next(ln for ln in head if ln.startswith("FAIL    PQ5"))
    assert "no value stored: the stored FAIL is kept" in fail, fail
