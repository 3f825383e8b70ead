"""Tryout 28, comparisons: `diff`, `scorecard` and `sweep-compare` write only into folders they made (item 2),
`diff` calls runs made with other decode/depth settings not like for like (item 3), `scorecard` refuses a folder
given twice (item 4). Fixture runs are the committed samples (made by the CLI on fork 69d8e4be4) and edited copies."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Run
from harness.report.render import write_json

SAMPLES = Path(__file__).resolve().parents[1] / "reports" / "samples"
VERIFY = SAMPLES / "cpu-verify"
SWEEP = SAMPLES / "sweep-cpu-smollm2"


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, (r.exit_code, r.output)
    return lines[0]


def _command(which: str, out: Path) -> list[str]:
    return {"diff": ["diff", str(VERIFY), str(VERIFY), "--out", str(out)],
            "scorecard": ["scorecard", str(VERIFY), "--out", str(out)],
            "sweep-compare": ["sweep-compare", str(SWEEP), "--out", str(out)]}[which]


OWN = {"diff": "diff.md", "scorecard": "scorecard.md", "sweep-compare": "compare.md"}


@pytest.mark.parametrize("which", list(OWN))
def test_an_out_folder_holding_the_users_files_is_refused_and_left_alone(tmp_path, which):
    """The user's own notes.txt and a same-named file (diff.md, ...) beside it: refused, one line, exit 2, both
    files as they were (the old code replaced the same-named one)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / OWN[which]).write_text("my own markdown")
    line = _one_line(CliRunner().invoke(cli, _command(which, out)))
    assert "--out" in line and "notes.txt" in line and "new or empty folder" in line
    assert (out / OWN[which]).read_text() == "my own markdown" and (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", OWN[which]])


@pytest.mark.parametrize("which", list(OWN))
def test_a_new_empty_or_own_folder_is_accepted(tmp_path, which):
    """New, empty, and one holding only the command's earlier output (written again) are accepted."""
    new = tmp_path / "new"
    r = CliRunner().invoke(cli, _command(which, new))
    assert r.exit_code in (0, 1), r.output
    first = sorted(p.name for p in new.iterdir())
    assert OWN[which] in first
    r = CliRunner().invoke(cli, _command(which, new))  # its own earlier output: replaced
    assert r.exit_code in (0, 1), r.output
    assert sorted(p.name for p in new.iterdir()) == first
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(cli, _command(which, empty)).exit_code in (0, 1)


def test_diff_out_dot_in_a_checkout_is_refused(tmp_path, monkeypatch):
    """`diff A B --out .` dropped diff.md/html/json and junit.xml into the checkout root."""
    (tmp_path / "README.md").write_text("a checkout")
    (tmp_path / "junit.xml").write_text("<testsuites name='CI'/>")
    monkeypatch.chdir(tmp_path)
    line = _one_line(CliRunner().invoke(cli, ["diff", str(VERIFY), str(VERIFY), "--out", "."]))
    assert "README.md" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "junit.xml"]
    assert (tmp_path / "junit.xml").read_text() == "<testsuites name='CI'/>"


@pytest.mark.parametrize("which", list(OWN))
def test_a_link_named_like_an_own_file_is_refused(tmp_path, which):
    """diff.md as a link to the user's file would be written through: not the command's own output."""
    target = tmp_path / "precious.md"
    target.write_text("keep")
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(target, out / OWN[which])
    _one_line(CliRunner().invoke(cli, _command(which, out)))
    assert target.read_text() == "keep"


def test_the_default_folder_is_checked_too(tmp_path, monkeypatch):
    """Without --out, scorecard writes reports/scorecard: a folder there holding other files is refused the same way."""
    monkeypatch.setenv("TURBO_REPORTS", str(tmp_path))
    (tmp_path / "scorecard").mkdir()
    (tmp_path / "scorecard" / "slides.pdf").write_text("x")
    import harness.cli as hc
    monkeypatch.setattr(hc, "REPORTS", tmp_path)
    r = CliRunner().invoke(cli, ["scorecard", str(VERIFY)])
    assert "slides.pdf" in _one_line(r)
    assert sorted(p.name for p in (tmp_path / "scorecard").iterdir()) == ["slides.pdf"]


def test_own_file_names_are_what_the_commands_write():
    """The names an --out folder may hold are exactly the files each command writes."""
    from harness.cli_compare import DIFF_FILES, SCORECARD_FILES
    from harness.cli_sweep import COMPARE_FILES
    from harness.report.diff_render import DIFF_RENDERERS
    from harness.report.scorecard_render import SCORECARD_RENDERERS
    assert set(DIFF_FILES) == {n for n, _ in DIFF_RENDERERS}
    assert set(SCORECARD_FILES) == {n for n, _ in SCORECARD_RENDERERS}
    import inspect
    from harness.report import compare
    src = inspect.getsource(compare.write_compare)
    assert all(f'"{n}"' in src for n in COMPARE_FILES)
