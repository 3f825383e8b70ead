"""A stored sweep report edited or damaged by hand (found by a new user's tries): `report`, `sweep-compare` and
`scorecard` stopped with a traceback (AttributeError on a string section, TypeError on rows [1], a PPL stored as
text). Now one stderr line naming the field, exit 2; the real sample sweeps still load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.sweep_shape import check_sweep_section

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "reports" / "samples" / "sweep-cpu-smollm2"


@pytest.fixture
def sweep_copy(tmp_path):
    if not (SAMPLE / "run.json").exists():
        pytest.fail(f"{SAMPLE} is missing: the sample sweep report ships with the repository")
    d = tmp_path / "sw"
    d.mkdir()
    (d / "run.json").write_text((SAMPLE / "run.json").read_text())
    return d


@pytest.mark.parametrize("name,edit", [
    ("sections.sweep", lambda s: s.__setitem__("sweep", "x")),
    ("sections.sweep", lambda s: s.__setitem__("sweep", [1])),
    ("sections.sweep.rows", lambda s: s["sweep"].__setitem__("rows", "x")),
    ("sections.sweep.rows[0]", lambda s: s["sweep"].__setitem__("rows", [1])),
    ("sections.sweep.speed", lambda s: s["sweep"].__setitem__("speed", "x")),
    ("sections.sweep.rows[0].ppl", lambda s: s["sweep"]["rows"][0].__setitem__("ppl", "abc")),
    ("sections.sweep.rules", lambda s: s["sweep"].__setitem__("rules", 3)),
])
def test_a_damaged_sweep_section_is_one_line(sweep_copy, tmp_path, name, edit):
    data = json.loads((sweep_copy / "run.json").read_text())
    edit(data["sections"])
    (sweep_copy / "run.json").write_text(json.dumps(data))
    for args in (["report", str(sweep_copy)], ["sweep-compare", str(sweep_copy), "--out", str(tmp_path / "c")],
                 ["scorecard", str(sweep_copy), "--out", str(tmp_path / "s")],
                 ["diff", str(sweep_copy), str(sweep_copy), "--out", str(tmp_path / "d")]):
        r = CliRunner().invoke(cli, args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output, repr(r.exception))
        want = "is a sweep report" if args[0] == "scorecard" else name  # scorecard refuses any sweep report first
        assert want in lines[0] and "run.json" in lines[0], lines


def test_every_stored_sweep_section_has_the_shape():
    """No false alarm: every sample report's sweep section passes the check."""
    seen = 0
    for f in (REPO / "reports" / "samples").rglob("run.json"):
        s = json.loads(f.read_text()).get("sections", {}).get("sweep")
        if s is not None:
            check_sweep_section(s)
            seen += 1
    assert seen >= 1
