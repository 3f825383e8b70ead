"""Issue 21, `turbo-harness scorecard`: several fork builds side by side, never a blank cell. The three fixture runs
come from the real pipeline (verify's run_checks) on NumPy emulations of three forks: the specification's
layouts, turbo4 in 66-byte blocks (no rnorm field: a layout the reference does not know), and a build without
turbo2."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.reference import turbo as T
from harness.report.scorecard import load_scorecard, root_finding
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks


class NoTurbo2(NumpyTarget):
    """A fork build that does not declare turbo2 (its type traits are absent)."""

    def type_info(self, type_name):
        return None if type_name == "turbo2" else super().type_info(type_name)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("forks")
    specs = [("spec", NumpyTarget(), ["PQ3", "PQ4"]),
             ("t4-66", NumpyTarget(formats={"turbo4": T.TurboFormat("turbo4", 4, 128, 66)}), ["PQ3", "PQ4"]),
             ("no-t2", NoTurbo2(), ["PQ4"])]  # PQ3 not run on this one: its column says so
    dirs = []
    for name, tgt, checks in specs:
        meta = {"fork_commit": f"{name:0<40}"[:40], "fork_remote": f"https://github.com/example/{name}.git",
                "fork_branch": "main"}
        run_checks(tgt, checks, list(T.TURBO_TYPES), root / name, meta=meta, log=lambda s: None)
        dirs.append(root / name)
    return dirs


def test_every_row_and_column_is_filled_with_a_value_or_a_reason(three_runs, tmp_path):
    r = CliRunner().invoke(cli, ["scorecard", *map(str, three_runs), "--out", str(tmp_path / "sc")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "sc" / "scorecard.json").read_text())
    assert len(d["rows"]) == 3 and d["columns"] == [f"{c} {t}" for c in ("PQ3", "PQ4") for t in T.TURBO_TYPES]
    for row in d["rows"]:
        for key in ("repository", "commit", "branch", "verdict", "backends", "root_finding"):
            assert str(row[key]).strip(), (row["run_id"], key)
        assert all(v.strip() for v in row["layouts"].values())
        assert set(row["scores"]) == set(d["columns"])
        for col, s in row["scores"].items():
            assert s["verdict"].strip() and s["text"].strip() and s["text"] != "-", (row["run_id"], col, s)
    spec, odd, no2 = d["rows"]
    assert spec["verdict"] == "PASS" and spec["layouts"]["turbo4"].startswith("128 values / 68 bytes") \
        and "norm + rnorm" in spec["layouts"]["turbo4"] and spec["root_finding"].startswith("none")
    # the unknown layout: its own layout text, the PQ4 finding as the root, every other turbo4 cell with the reason
    assert "66 bytes" in odd["layouts"]["turbo4"] and "no rnorm" in odd["layouts"]["turbo4"] and "UNKNOWN" in odd["layouts"]["turbo4"]
    assert odd["root_finding"].startswith("FAIL PQ4 turbo4") and "66 bytes" in odd["root_finding"]
    assert odd["scores"]["PQ3 turbo4"]["verdict"] == "SKIP" and "no known layout" in odd["scores"]["PQ3 turbo4"]["text"]
    assert odd["scores"]["PQ3 turbo3"]["verdict"] == "PASS"
    # the missing type: layout and PQ4 say so; the check that was not run says that
    assert "type missing from the build" in no2["layouts"]["turbo2"]
    assert no2["scores"]["PQ4 turbo2"]["verdict"] == "FAIL" and "no type named turbo2" in no2["scores"]["PQ4 turbo2"]["text"]
    assert no2["scores"]["PQ3 turbo3"] == {"verdict": "NOT MEASURED", "text": "PQ3 was not run in this report"}
    assert no2["repository"] == "https://github.com/example/no-t2.git" and no2["branch"] == "main"
    md = (tmp_path / "sc" / "scorecard.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "fork (repository" not in ln]
    assert len(table) == 3 and all("|  |" not in ln and "| |" not in ln for ln in table)
    page = (tmp_path / "sc" / "scorecard.html").read_text()
    assert "#ffcdd2" in page and "#c8e6c9" in page  # FAIL and PASS colours


def test_root_finding_is_upstream_first(tmp_path):
    # the committed CPU sample of fork 69d8e4be4: PQ2 turbo4 PARTIAL (codebook) causes PQ5 turbo4 FAIL (distortion)
    from harness.pipeline import load_run
    run = load_run(Path(__file__).resolve().parents[1] / "reports" / "samples" / "cpu-verify")
    assert root_finding(run).startswith("PARTIAL PQ2 turbo4")
    # a type missing from the build (often by design on an experiment branch) comes after the fork's other findings
    from harness.report.model import Cell, Verdict
    pq4 = next(c for c in run.checks if c.id == "PQ4")
    pq4.cells.append(Cell("PQ4", "turbo2", "cpu:traits", "-", None, None, Verdict.FAIL,
                          caveat="the build has no type named turbo2"))
    assert root_finding(run).startswith("PARTIAL PQ2 turbo4")
    for c in run.checks:
        c.cells = [x for x in c.cells if x.verdict.value == "PASS" or "no type named" in x.caveat]
    assert root_finding(run).startswith("FAIL PQ4 turbo2") and "no type named turbo2" in root_finding(run)


def test_fork_identity_from_a_git_checkout(tmp_path, three_runs):
    """A checkout's remote (credentials stripped) and branch reach the report through the build's git state."""
    from harness.fork.build import git_state
    repo = tmp_path / "fork"
    repo.mkdir()
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)
    run("init", "-q", "-b", "experiment/x")
    (repo / "f").write_text("x")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    run("remote", "add", "origin", "https://user:secret@github.com/example/fork.git")
    st = git_state(repo)
    assert st["branch"] == "experiment/x" and st["remote"] == "https://github.com/example/fork.git"


def test_bad_input(tmp_path):
    r = CliRunner().invoke(cli, ["scorecard", str(tmp_path / "none")])
    assert r.exit_code == 2 and "RUN_DIRS" in r.output and "does not exist" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["scorecard"])
    assert r.exit_code == 2 and "give one or more run folders" in r.output
    with pytest.raises(Exception):
        load_scorecard([])


def test_make_scorecard_reuses_a_build_only_by_provenance(tmp_path):
    """`make scorecard FORKS=...` (harness.fork.forks): one build folder per fork commit, reused only when its record
    matches the checkout and it holds the targets and the probe."""
    from harness.fork import build as fb
    from harness.fork import forks
    repo = tmp_path / "fork"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                    check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (repo / "f").write_text("x")
    git("add", "f")
    git("commit", "-qm", "c")
    st = fb.git_state(repo)
    assert forks.label(st) == st["commit"][:12]
    bdir = tmp_path / "b" / "cpu"
    assert forks.reusable(bdir, repo, st, forks.SCORECARD_TARGETS) == "no build recorded there"
    (bdir / "turbo-probe").mkdir(parents=True)
    meta = {"fork_commit": st["commit"], "fork_dirty": False, "fork_diff_sha256": None, "targets": ["ggml"]}
    (bdir / fb.BUILD_META).write_text(json.dumps(meta))
    assert "test-backend-ops not built" in forks.reusable(bdir, repo, st, forks.SCORECARD_TARGETS)
    (bdir / fb.BUILD_META).write_text(json.dumps(dict(meta, targets=forks.SCORECARD_TARGETS)))
    assert forks.reusable(bdir, repo, st, forks.SCORECARD_TARGETS) == "no probe built"
    (bdir / "turbo-probe" / "libturbo_probe.so").write_text("")
    assert forks.reusable(bdir, repo, st, forks.SCORECARD_TARGETS) is None  # same commit, clean, complete: reused
    (repo / "f").write_text("changed")  # uncommitted change: another label, and this build is not reused for it
    dirty = fb.git_state(repo)
    assert forks.label(dirty).startswith(st["commit"][:12] + "-dirty-")
    assert "uncommitted changes" in forks.reusable(bdir, repo, dirty, forks.SCORECARD_TARGETS)
    git("commit", "-qam", "d")
    assert "another commit" in forks.reusable(bdir, repo, fb.git_state(repo), forks.SCORECARD_TARGETS)
    assert forks.main([]) == 2
    assert forks.targets_for("cpu") == ["ggml"] and "test-backend-ops" in forks.targets_for("cuda")


def test_make_scorecard_without_forks_is_one_line_exit_2():
    from conftest import repo_install_lock
    with repo_install_lock():  # `make scorecard` first makes `install` in this repository
        r = subprocess.run(["make", "-s", "scorecard", "FORKS="], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True)
    assert r.returncode == 2 and "make scorecard FORKS=" in r.stderr


def test_mixed_pair_of_a_missing_type_is_scored_under_the_type_that_failed():
    """turbo3/turbo2 crashing in turbo3's set_rows on a build without turbo2 is turbo3's FAIL, not turbo2's; on a
    build with both types a mixed pair counts for both (a failure is never hidden)."""
    from harness.report.model import Cell, CheckResult, Run, Verdict
    from harness.report.scorecard import missing_types, score
    crash = Cell("PQ6", "turbo3/turbo2", "cpu:flash_attn[turbo3/turbo2]", "rel_err", None, 0.005, Verdict.FAIL,
                 caveat="fork code crashed in probe call set_rows")
    pure = Cell("PQ6", "turbo2/turbo2", "cpu:flash_attn[turbo2/turbo2]", "rel_err", None, 0.005, Verdict.SKIP,
                caveat="not supported: this fork build has no ggml type named 'turbo2'")
    traits = Cell("PQ4", "turbo2", "cpu:traits", "-", None, None, Verdict.FAIL, caveat="the build has no type named turbo2")
    run = Run("r", meta={"types": ["turbo2", "turbo3", "turbo4"]},
              checks=[CheckResult("PQ4", "Layout", [traits]), CheckResult("PQ6", "Attention", [pure, crash])])
    miss = missing_types(run)
    assert score(run, "PQ6", "turbo2", miss).verdict == "SKIP" and score(run, "PQ6", "turbo3", miss).verdict == "FAIL"
    run.checks[0].cells = []  # turbo2 present: the mixed pair's FAIL shows under both types
    assert score(run, "PQ6", "turbo2", missing_types(run)).verdict == "FAIL"


def test_a_skipped_target_path_is_not_scored_pass_by_a_fallback_that_passed():
    """PQ5 turbo4: the target path (cpu:set_rows) not measured (SKIP), a fallback path (quantize_chunk) PASS. The run's
    verdict is SKIP; the scorecard showed PASS (the fallback's value, the SKIP in the small print). The target path
    decides: SKIP with its reason."""
    from harness.report.model import Cell, CheckResult, Run, Verdict
    from harness.report.scorecard import score
    run = Run(run_id="r", meta={"target_backend": "cpu", "types": ["turbo4"]})
    run.checks.append(CheckResult("PQ5", "Distortion", [
        Cell("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max", None, 1.05, Verdict.SKIP, caveat="not measured: x",
             target=True),
        Cell("PQ5", "turbo4", "cpu:quantize_chunk", "nmse_over_lloyd_max", 1.0, 1.05, Verdict.PASS, target=False)]))
    s = score(run, "PQ5", "turbo4", {})
    assert s.verdict == "SKIP" and "not measured: x" in s.text, s
    # with the target path measured, SKIPs elsewhere do not hide its PASS
    run.checks[0].cells[0] = Cell("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max", 1.0, 1.05, Verdict.PASS,
                                  target=True)
    run.checks[0].cells[1].verdict, run.checks[0].cells[1].target = Verdict.SKIP, False
    assert score(run, "PQ5", "turbo4", {}).verdict == "PASS"


def test_make_scorecard_never_empties_a_folder_it_did_not_write(tmp_path, monkeypatch):
    """`make scorecard OUT=DIR` verifies each fork into DIR/forks/<label>, removing an earlier report there first. A
    folder of that name that holds no turbo-harness report (the user's own files) was removed as well; it is kept,
    and that fork is reported as not scored (exit 2)."""
    from harness.fork import build as fb
    from harness.fork import forks
    commit = "a" * 40
    monkeypatch.setattr(fb, "fork_dir", lambda d: Path(d))
    monkeypatch.setattr(fb, "require_turbo", lambda f: None)
    monkeypatch.setattr(fb, "git_state", lambda f: {"commit": commit, "dirty": False})
    monkeypatch.setattr(forks, "reusable", lambda *a: None)
    calls = []
    monkeypatch.setattr(forks, "run", lambda cmd, env: calls.append(cmd) or 0)
    mine = tmp_path / "out" / "forks" / commit[:12] / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes")
    assert forks.main([str(tmp_path / "fork"), "--out", str(tmp_path / "out"), "--backend", "cpu"]) == 2
    assert mine.read_text() == "my notes"
    assert not any("verify" in c for c in calls)
    # an earlier report of the harness there is replaced
    mine.unlink()
    (mine.parent / "run.json").write_text("{}")
    assert forks.main([str(tmp_path / "fork"), "--out", str(tmp_path / "out"), "--backend", "cpu"]) == 0
    assert not (mine.parent / "run.json").exists() and any("verify" in c for c in calls)


def test_scorecard_says_when_it_rejudged_a_run(tmp_path):
    """A run whose cell verdicts were edited to PASS is re-judged when the scorecard reads it (as `report` and `diff`
    do) and the scorecard says so on stderr, naming the folder; it did so silently."""
    from harness.report.model import Cell, CheckResult, Run, Verdict
    from harness.report.render import write_all
    run = Run(run_id="r", meta={"target_backend": "cpu", "types": ["turbo4"]})
    run.checks.append(CheckResult("PQ5", "Distortion", [Cell("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max",
                                                              1.945, 1.05, Verdict.FAIL, target=True)]))
    d = tmp_path / "run"
    write_all(run, d)
    data = json.loads((d / "run.json").read_text())
    data["checks"][0]["cells"][0]["verdict"] = "PASS"
    (d / "run.json").write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["scorecard", str(d), "--out", str(tmp_path / "sc")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "re-judged 1 cell" in r.stderr and str(d) in r.stderr, r.stderr
    assert r.stdout.splitlines()[0].startswith("FAIL")


def test_a_type_absence_measured_by_pq4_is_a_missing_type_ranked_after_other_findings():
    """PQ4 records a missing type as a measured cell (type_present = 0, limit >= 1): the scorecard still reads it as
    a type the build lacks (layout column, and ranked after the fork's other findings), not as the root finding."""
    from harness.report.model import Cell, CheckResult, Run, Verdict
    from harness.report.scorecard import missing_types
    absent = Cell("PQ4", "turbo2", "cpu:traits", "type_present", 0, 1, Verdict.FAIL, op=">=",
                  caveat="the build has no type named turbo2 (measured: its type traits are absent; nothing crashed)")
    crash = Cell("PQ4", "turbo3", "cpu:set_rows", "mismatches", None, 0, Verdict.FAIL,
                 caveat="fork code crashed in probe call set_rows")
    run = Run("r", meta={"types": ["turbo2", "turbo3", "turbo4"]}, checks=[CheckResult("PQ4", "Layout", [absent, crash])])
    assert "type missing from the build" in missing_types(run)["turbo2"]
    assert root_finding(run).startswith("FAIL PQ4 turbo3"), root_finding(run)
    run.checks[0].cells = [absent]
    assert root_finding(run).startswith("FAIL PQ4 turbo2")


def test_a_run_whose_every_finding_is_known_still_names_its_root(tmp_path):
    # `report RUN --known` rewrites run.json with the known findings marked XFAIL; the fork still has them (the run
    # stays FAIL), so the scorecard's root finding is the first of them, never 'none (FAIL ...)'
    import shutil
    from click.testing import CliRunner
    from harness.cli import cli
    from harness.pipeline import load_run
    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "cpu-verify"
    shutil.copytree(root / "reports" / "samples" / "cpu-verify", run_dir)
    r = CliRunner().invoke(cli, ["report", str(run_dir), "--known", str(root / "checks" / "known-findings.toml")])
    assert r.exit_code == 0, r.output
    run = load_run(run_dir)
    assert run.verdict.value != "PASS"
    line = root_finding(run)
    assert line.startswith("XFAIL PQ2 turbo4") and "Expected (" in line, line
