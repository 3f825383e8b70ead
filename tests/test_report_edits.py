"""Edited run.json reports found by a new user's tries (`report` re-judges a run from its values).

Before the fix an unknown comparison op (a cell edited from '<=' to '~', value 0.5 against limit 0.001) made
the cell impossible to re-judge and its stored PASS was taken on trust: `report` rendered PASS and exited 0.
A missing field or an unknown verdict string surfaced as a bare KeyError / TypeError text.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Cell, CheckResult, Run, Verdict
from harness.report.render import write_all


def _run(tmp_path):
    """One passing PQ3 cell on the target path (0.0 <= 0.001), as `check PQ3` writes it."""
    run = Run(run_id="r", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("PQ3", "Norms", [
        Cell("PQ3", "turbo4", "cpu:set_rows", "frac_groups_ratio_off", 0.0, 0.001, Verdict.PASS)]))
    d = tmp_path / "run"
    write_all(run, d)
    return d


def _edit(d, **fields):
    data = json.loads((d / "run.json").read_text())
    cell = data["checks"][0]["cells"][0]
    for k, v in fields.items():
        if v is KeyError:
            del cell[k]
        else:
            cell[k] = v
    (d / "run.json").write_text(json.dumps(data))


@pytest.mark.parametrize("op", ["~", "", "<=>", "lt"])
def test_an_unknown_op_cannot_keep_a_stored_pass(tmp_path, op):
    """value 0.5 over its limit 0.001 with the op edited to something unknown: never PASS/exit 0; one stderr line
    naming the field and the file, exit 2 (the report cannot be re-judged)."""
    d = _run(tmp_path)
    _edit(d, value=0.5, op=op)
    r = CliRunner().invoke(cli, ["report", str(d)], catch_exceptions=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "'op'" in lines[0] and "run.json" in lines[0], lines


@pytest.mark.parametrize("field", ["verdict", "threshold", "value", "metric"])
def test_a_missing_field_is_named(tmp_path, field):
    """A cell with a required field deleted: one line saying which field of which cell is missing, exit 2."""
    d = _run(tmp_path)
    _edit(d, **{field: KeyError})
    r = CliRunner().invoke(cli, ["report", str(d)], catch_exceptions=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and f"field '{field}' is missing" in lines[0] and "cell 1 of check PQ3" in lines[0], lines


def test_an_unknown_verdict_is_named(tmp_path):
    d = _run(tmp_path)
    _edit(d, verdict="GREAT")
    r = CliRunner().invoke(cli, ["report", str(d)], catch_exceptions=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "field 'verdict'" in lines[0] and "PASS" in lines[0], lines


def _edit_run(d, fn):
    data = json.loads((d / "run.json").read_text())
    fn(data)
    (d / "run.json").write_text(json.dumps(data))


@pytest.mark.parametrize("what,edit", [
    ("meta", lambda r: r.update(meta="x")),
    ("sections", lambda r: r.update(sections=[1])),
    ("checks", lambda r: r.update(checks={"PQ3": 1})),
    ("run_id", lambda r: r.update(run_id=7)),
    ("interrupted", lambda r: r.update(interrupted="yes")),
    ("duration_s", lambda r: r["checks"][0].update(duration_s="x")),
    ("id", lambda r: r["checks"][0].update(id=5)),
    ("notes", lambda r: r["checks"][0].update(notes="a note")),
    ("tables", lambda r: r["checks"][0].update(tables=[1])),
    ("cells", lambda r: r["checks"][0].update(cells={})),
    ("check 1", lambda r: r["checks"].__setitem__(0, "PQ3")),
])
def test_a_run_of_the_wrong_shape_is_one_line_not_a_traceback(tmp_path, what, edit):
    """run.json edited at run or check level (meta a string, a check id a number, cells an object): `report`,
    `diff`, `scorecard` and a `check --out` into the folder stopped with a traceback (AttributeError: 'str' object
    has no attribute 'get'; TypeError from round()), or read cells {} as 'nothing judged'. One line, exit 2."""
    d = _run(tmp_path)
    _edit_run(d, edit)
    for args in (["report", str(d)], ["diff", str(d), str(d), "--out", str(tmp_path / "o")],
                 ["scorecard", str(d), "--out", str(tmp_path / "s")]):
        r = CliRunner().invoke(cli, args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output, repr(r.exception))
        assert "run.json" in lines[0] and what in lines[0], lines
