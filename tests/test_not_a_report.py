"""A run.json that is not a turbo-harness report: one clean line naming the file and the fix, exit 2.

Tryout: `report D` on a folder whose run.json was some other JSON printed "... (ValueError: not a turbo-harness run
report of schema 1.1 (got None )) ...": a Python exception name and an empty 'got None' where the reader needs to be
told what the file is and what to do.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import cli


@pytest.mark.parametrize("content,says", [
    ({"foo": 1}, 'has no "schema": "turbo-harness/run"'),
    ([1, 2], "holds a JSON list, not a report object"),
    ({"schema": "other-tool/result", "schema_version": "1.0"}, 'its "schema" is \'other-tool/result\''),
    ({"schema": "turbo-harness/run", "schema_version": "2.0"}, "its schema version is 2.0, this one reads 1.x"),
    ({"schema": "turbo-harness/run", "schema_version": "1.1", "run_id": "r", "meta": "x"}, "field 'meta' is str"),
])
@pytest.mark.parametrize("command", ["report", "verify"])
def test_a_run_json_that_is_not_a_report_is_one_clean_line(tmp_path, content, says, command):
    d = tmp_path / "d"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(content))
    args = ["report", str(d)] if command == "report" else [
        "verify", "--numpy-target", "", "--checks", "PQ4", "--type", "turbo3", "--out", str(d)]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    line = lines[0]
    assert str(d / "run.json") in line and says in line, line
    assert "Error" not in line and "got None" not in line, line  # no Python exception names, no empty 'got'
    assert ("give a run folder written by turbo-harness" in line or "restore it" in line if command == "report"
            else "give a new --out folder" in line), line
    assert json.loads((d / "run.json").read_text()) == content  # left as it is
