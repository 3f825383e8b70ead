"""Tryout 28, comparisons: `diff`, `scorecard` and `sweep-compare` write only into folders they made (item 2),
`diff` calls runs made with other decode/depth settings not like for like (item 3), `scorecard` refuses a folder
given twice (item 4). Fixture runs are the committed samples (made by the CLI on fork 69d8e4be4) and edited copies."""
from __future__ import annotations

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


# ---- item 3: diff's like-for-like check covers every setting that changes a sweep cell's measurement

def _sweep_copy(tmp: Path, name: str, edit, src: Path = SWEEP) -> Path:
    d = json.loads((src / "run.json").read_text())
    edit(d)
    out = tmp / name
    out.mkdir()
    write_json(Run.from_dict(d), out)
    return out


def _decode(prompts, prompt_tokens=64, tokens=32):
    def edit(d):
        d["sections"]["decode"]["settings"].update(prompts=prompts, prompt_tokens=prompt_tokens, generated_tokens=tokens)
    return edit


def _pinned(key, value):
    def edit(d):
        for p in (d["sections"]["sweep"]["pinned"], d["meta"]["pinned"]):
            p[key] = value
    return edit


def _depths(depths):
    def edit(d):
        d["sections"]["depth"]["depths"] = depths
    return edit


def _meta(key, value):
    def edit(d):
        d["meta"][key] = value
    return edit


@pytest.mark.parametrize("edit,named", [
    (_decode(1), "decode_prompts 3 -> 1"),                      # the tryout: decode prompts 1 vs 2, BETTER, no flag
    (_decode(3, prompt_tokens=128), "decode_prompt_tokens 64 -> 128"),
    (_decode(3, tokens=16), "decode_tokens 32 -> 16"),
    (_depths([256, 512]), "kld_depths [256, 512, 1024] -> [256, 512]"),
    (_pinned("reps", 5), "reps 3 -> 5"),
    (_pinned("depths", [0, 512]), "depths [0, 256] -> [0, 512]"),
    (_pinned("ubatch", 128), "ubatch 256 -> 128"),
    (_pinned("batch", 128), "batch 256 -> 128"),
    (_meta("corpus_sha256", "0" * 64), "OTHER CORPUS"),
], ids=["decode-prompts", "decode-prompt-tokens", "decode-tokens", "kld-depths", "reps", "depths", "ubatch", "batch",
        "corpus"])
def test_a_sweep_made_with_other_settings_is_not_like_for_like(tmp_path, edit, named):
    base = _sweep_copy(tmp_path, "a", lambda d: None)
    new = _sweep_copy(tmp_path, "b", edit)
    r = CliRunner().invoke(cli, ["diff", str(base), str(new), "--out", str(tmp_path / "d")])
    assert "NOT LIKE FOR LIKE" in r.output.splitlines()[0], r.output
    assert named in r.output, r.output
    assert json.loads((tmp_path / "d" / "diff.json").read_text())["comparable"] is False


def test_a_sweep_diffed_with_itself_is_like_for_like(tmp_path):
    base = _sweep_copy(tmp_path, "a", lambda d: None)
    new = _sweep_copy(tmp_path, "b", lambda d: None)
    r = CliRunner().invoke(cli, ["diff", str(base), str(new), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0 and "NOT LIKE FOR LIKE" not in r.output, r.output


def test_decode_on_against_decode_off_is_not_like_for_like(tmp_path):
    """A sweep run with --decode-prompts 0 has no decode section: its decode is off (0 prompts), not 'unset'."""
    base = _sweep_copy(tmp_path, "a", lambda d: None)
    new = _sweep_copy(tmp_path, "b", lambda d: d["sections"].pop("decode"))
    r = CliRunner().invoke(cli, ["diff", str(base), str(new), "--out", str(tmp_path / "d")])
    assert "NOT LIKE FOR LIKE" in r.output and "decode_prompts 3 -> 0" in r.output, r.output


def test_the_recorded_settings_name_decode_and_depth(tmp_path):
    """New sweeps record the decode and depth settings with the other pinned ones (cross-backend sides too), and a
    report that records them compares like for like with one that only has them in its sections."""
    from harness.runners.sweep_config import SweepConfig
    cfg = SweepConfig(model=Path("m.gguf"), corpus=Path("c.txt"), pairs=[("f16", "f16")], bdir=Path("b"),
                      decode_prompts=2, decode_n_prompt=64, decode_n_gen=32, kld_depths=(256, 512))
    p = cfg.pinned()
    assert (p["decode_prompts"], p["decode_prompt_tokens"], p["decode_tokens"], p["kld_depths"]) == (2, 64, 32, [256, 512])
    old = _sweep_copy(tmp_path, "old", lambda d: None)

    def recorded(d):
        for pin in (d["sections"]["sweep"]["pinned"], d["meta"]["pinned"]):
            pin.update(decode_prompts=3, decode_prompt_tokens=64, decode_tokens=32, kld_depths=[256, 512, 1024])
    new = _sweep_copy(tmp_path, "new", recorded)
    r = CliRunner().invoke(cli, ["diff", str(old), str(new), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0 and "NOT LIKE FOR LIKE" not in r.output, r.output


def test_cross_backend_sweeps_compare_their_sides_settings(tmp_path):
    """A cross-backend report keeps its settings per side (meta.sides): other ctx on a side is not like for like."""
    src = SAMPLES / "xbackend-cuda-h100-smollm2"
    a = _sweep_copy(tmp_path, "a", lambda d: None, src)
    b = _sweep_copy(tmp_path, "b", lambda d: d["meta"]["sides"]["cuda"].update(ctx=256), src)
    r = CliRunner().invoke(cli, ["diff", str(a), str(b), "--out", str(tmp_path / "d")])
    assert "NOT LIKE FOR LIKE" in r.output and "cuda.ctx 512 -> 256" in r.output, r.output
    same = _sweep_copy(tmp_path, "c", lambda d: d["meta"]["sides"]["cuda"].update(build_dir="/elsewhere/cuda"), src)
    r = CliRunner().invoke(cli, ["diff", str(a), str(same), "--out", str(tmp_path / "e")])
    assert "NOT LIKE FOR LIKE" not in r.output, r.output  # where the build lies is not a measurement setting


# ---- item 4: scorecard refuses one run folder given twice, however it is written

@pytest.mark.parametrize("second", ["same", "slash", "relative", "link"])
def test_scorecard_refuses_a_folder_given_twice(tmp_path, monkeypatch, second):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    write_json(Run.from_dict(json.loads((VERIFY / "run.json").read_text())), run)
    os.symlink(run, tmp_path / "runs" / "link")
    monkeypatch.chdir(tmp_path)
    again = {"same": str(run), "slash": str(run) + "/", "relative": "runs/a", "link": str(tmp_path / "runs" / "link")}
    out = tmp_path / "sc"
    line = _one_line(CliRunner().invoke(cli, ["scorecard", str(run), again[second], "--out", str(out)]))
    assert "given twice" in line
    assert not out.exists()


def test_an_unreadable_out_folder_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """review 28b: foreign_output's PermissionError (a folder the user may not list) came out as a traceback."""
    from harness import cli_types
    from harness.errors import HarnessError
    d = tmp_path / "locked"
    d.mkdir()

    def denied(p, own):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cli_types, "foreign_output", denied)
    with pytest.raises(HarnessError, match=r"--out .*locked cannot be read \(Permission denied\)"):
        cli_types.check_output_dir(d, {"diff.md"}, "diff")
