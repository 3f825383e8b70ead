"""Replay builds and sources, on a fake fork (a tiny CMake project in a git repository; no real fork needed):
unit vs model configure, git kept out of the build, reuse by recorded commit, one-tree incremental builds, exported
source tarballs read without git, and the catalogue's record."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.errors import HarnessError
from harness import replay_src as rs
from harness.replay import build_commit, export_source, targets_for

needs_cmake = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("cc")), reason="needs cmake and a C compiler")

CMAKE = """cmake_minimum_required(VERSION 3.14)
project(fake C)
option(LLAMA_BUILD_TOOLS "tools" ON)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
# as the fork's ggml/CMakeLists.txt does: the commit of whatever repository git finds from the source folder
execute_process(COMMAND git rev-parse --short HEAD WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}
                OUTPUT_VARIABLE STAMP OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
file(WRITE ${CMAKE_BINARY_DIR}/stamp.txt "${STAMP}")
file(GLOB SRCS ggml/src/*.c)
add_library(ggml-base SHARED ${SRCS})
add_library(ggml SHARED ggml/g.c)
target_link_libraries(ggml ggml-base)
if (LLAMA_BUILD_TOOLS)
  add_executable(llama-save-load-state tools/t.c)
  add_executable(llama-perplexity tools/t.c)
endif()
"""


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit_all(repo, msg):
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", msg)
    return git(repo, "rev-parse", "HEAD")


def fake_fork(tmp_path: Path) -> tuple[Path, list[str]]:
    """A fork with three commits: c1; c2 changes b.c; c3 adds c.c and removes a.c. Plus docs/ (left out of tarballs)."""
    repo = tmp_path / "fork"
    for p, text in {"ggml/include/ggml.h": "GGML_TYPE_TURBO3_0\n", "CMakeLists.txt": CMAKE, "ggml/g.c": "int g(void){return 1;}\n",
                    "ggml/src/a.c": "int a(void){return 1;}\n", "ggml/src/b.c": "int b(void){return 1;}\n",
                    "tools/t.c": "int main(void){return 0;}\n", "docs/big.md": "x" * 1000}.items():
        (repo / p).parent.mkdir(parents=True, exist_ok=True)
        (repo / p).write_text(text)
    git(tmp_path, "init", "-q", str(repo))
    c1 = commit_all(repo, "first")
    (repo / "ggml/src/b.c").write_text("int b(void){return 2;}\n")
    c2 = commit_all(repo, "second: b changes")
    (repo / "ggml/src/c.c").write_text("int c(void){return 3;}\n")
    (repo / "ggml/src/a.c").unlink()
    c3 = commit_all(repo, "third: c added, a removed")
    return repo, [c1, c2, c3]


def objects(bdir: Path) -> dict:
    """{object file name: modification time (ns)} of a build folder."""
    return {o.name: o.stat().st_mtime_ns for o in bdir.rglob("*.o")}


def rebuilt(before: dict, after: dict) -> set:
    return {k for k, v in after.items() if before.get(k) != v}


def test_model_targets_follow_the_entry_options():
    assert targets_for(["PQ4"]) == ("ggml",)
    assert targets_for(["MODEL"]) == ("ggml", "llama-perplexity", "llama-save-load-state")
    assert targets_for(["MODEL"], {"MODEL": {"ppl": False}}) == ("ggml", "llama-save-load-state")
    assert targets_for(["MODEL"], {"MODEL": {"state": False}}) == ("ggml", "llama-perplexity")


@needs_cmake
def test_unit_builds_configure_ggml_only_hide_the_enclosing_repository_and_are_reused_by_commit(tmp_path, monkeypatch):
    repo, (c1, c2, _) = fake_fork(tmp_path)
    harness = tmp_path / "harness"  # the replay cache inside another repository (the default .cache/replay)
    harness.mkdir()
    git(tmp_path, "init", "-q", str(harness))
    (harness / "x").write_text("x")
    commit_all(harness, "harness")
    root = harness / ".cache" / "replay"
    monkeypatch.setenv("GIT_DIR", str(harness / ".git"))  # as inside a bisection: must not reach the fork's CMake
    src, b, meta = build_commit(repo, c1, root=root, log=lambda s: None)
    cache = (b / "CMakeCache.txt").read_text()
    assert not meta["reused"] and meta["fork_commit"] == c1 and meta["build_cpu_seconds"] >= 0 and meta["build_seconds"] > 0
    assert "LLAMA_BUILD_TOOLS:BOOL=OFF" in cache and re.search(r"LLAMA_BUILD_TESTS:\w+=OFF", cache)
    assert (b / "stamp.txt").read_text() == "", "the harness repository's commit leaked into the fork's build"
    assert not (b / "bin" / "llama-save-load-state").exists()
    again = build_commit(repo, c1, root=root, log=lambda s: None)[2]
    assert again["reused"]
    model = build_commit(repo, c1, targets=targets_for(["MODEL"]), root=root, log=lambda s: None)[2]
    assert not model["reused"] and (b / "bin" / "llama-save-load-state").exists()
    assert "LLAMA_BUILD_TOOLS:BOOL=ON" in (b / "CMakeCache.txt").read_text()
    assert build_commit(repo, c1, root=root, log=lambda s: None)[2]["reused"]  # the model folder serves unit checks too
    # a folder whose recorded commit is another one is not reused, whatever its name says
    meta_file = b / "turbo-harness-build.json"
    m = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(m, fork_commit=c2)))
    assert not build_commit(repo, c1, root=root, log=lambda s: None)[2]["reused"]


@needs_cmake
@pytest.mark.skipif(not shutil.which("ninja"), reason="the incremental check reads Ninja's log")
def test_one_tree_recompiles_only_the_files_that_differ_between_commits(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_CCACHE", "0")  # real compiles, so that the object files show what was rebuilt
    repo, (c1, c2, c3) = fake_fork(tmp_path)
    root = tmp_path / "cache"
    logs = []

    def build(c, **kw):
        before = objects(root / "tree-build" / "build")
        _, b, meta = build_commit(repo, c, root=root, one_tree=True, log=logs.append, **kw)
        assert b == root / "tree-build" / "build"
        return rebuilt(before, objects(b)), meta
    built, m1 = build(c1, targets=targets_for(["MODEL"]))
    assert not m1["reused"] and built >= {"a.c.o", "b.c.o", "g.c.o"}
    built, m2 = build(c2)
    assert built == {"b.c.o"}, built
    assert m2["fork_commit"] == c2 and m2["targets"] == ["ggml"]  # c1's tools are stale: not claimed for c2
    assert any("2 files changed, 0 added, 0 removed" in s for s in logs)  # b.c and the .fork-commit stamp
    assert not build(c2, targets=targets_for(["MODEL"]))[1]["reused"]
    built, m = build(c2)
    assert m["reused"] and not built
    built, _ = build(c3)  # a file added, one removed: the sources are globbed again
    assert built == {"c.c.o"}, built
    assert {p.name for p in (root / "tree-build" / "src" / "ggml" / "src").iterdir()} == {"b.c", "c.c"}
    built, _ = build(c1)  # back again: only what differs
    assert built == {"a.c.o", "b.c.o"}, built


def test_sync_tree_rewrites_only_what_differs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, files in ((a, {"same.c": "1", "changed.c": "new", "sub/added.c": "x"}), (b, {"same.c": "1", "changed.c": "old",
                                                                                          "gone/removed.c": "y"})):
        for p, t in files.items():
            (d / p).parent.mkdir(parents=True, exist_ok=True)
            (d / p).write_text(t)
    (a / "link").symlink_to("same.c")
    old = time.time() - 1000
    os.utime(b / "same.c", (old, old))
    assert rs.sync_tree(a, b) == {"changed": 1, "added": 2, "removed": 1}
    assert (b / "changed.c").read_text() == "new" and (b / "sub" / "added.c").is_file() and not (b / "gone").exists()
    assert abs((b / "same.c").stat().st_mtime - old) < 1 and os.readlink(b / "link") == "same.c"
    assert rs.sync_tree(a, b) == {"changed": 0, "added": 0, "removed": 0}


def test_sources_folder_replaces_the_history_on_a_machine_without_git(tmp_path, monkeypatch):
    repo, (c1, c2, _) = fake_fork(tmp_path)
    out = tmp_path / "sources"
    r = CliRunner().invoke(cli, ["replay-export", "--commit", c1, "--commit", c2[:10], "--out", str(out),
                                 "--fork-dir", str(repo)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    index = rs.load_index(out)
    assert set(index) == {c1, c2} and index[c2]["subject"].endswith("second: b changes")
    from_git = export_source(repo, c2, tmp_path / "gitcache")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no git from here on
    with pytest.raises(FileNotFoundError):
        subprocess.run(["git", "--version"])
    fork = rs.history_dir(str(out))
    assert rs.resolve(fork, c2[:8]) == c2 and rs.git_subject(fork, c1).endswith("first")
    src = export_source(fork, c2, tmp_path / "cache")
    assert (src / ".fork-commit").read_text().strip() == c2 and not (src / "docs").exists() and (from_git / "docs").exists()
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(from_git).as_posix() for p in from_git.rglob("*") if p.is_file() and "docs" not in p.parts)
    with pytest.raises(HarnessError, match="not among the exported sources"):
        rs.resolve(fork, "0123abcd")
    with pytest.raises(HarnessError, match="bisect needs"):
        rs.git_dir_of(fork)
    f = out / index[c1]["file"]
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(HarnessError, match="SHA-256"):
        export_source(fork, c1, tmp_path / "cache")
    assert not (tmp_path / "cache" / c1 / "src").exists()


def test_catalogue_record_and_exit_code_follow_the_verdicts(tmp_path, monkeypatch):
    import harness.cli_catalogue as cc
    from harness.report.model import Cell, CheckResult, Run, Verdict
    e = next(x for x in cc.load_catalogue() if x["id"] == "turbo3-cpu-quantize-stub")
    src = tmp_path / "sources"
    src.mkdir()
    (src / rs.INDEX).write_text(json.dumps({"commits": {}}))
    parent_verdict = {"v": Verdict.FAIL}

    def fake_replay(fork, rev, checks, types, routes, out=None, log=None, label="", options=None, sanitize=None,
                    prefer=None, backend="cpu", one_tree=False):
        v = parent_verdict["v"] if rev == e["parent"] else Verdict.PASS
        run = Run(run_id="x", meta={"fork_commit": rev, "build_seconds": 12.5, "build_cpu_seconds": 20.0,
                                    "replay_compiler": "default", "build_dir": "b", "one_tree": one_tree})
        run.checks.append(CheckResult(id="PQ5", title="t", cells=[Cell("PQ5", "turbo3", "cpu:set_rows", "nmse", 2.0, 0.04, v)]))
        return run, tmp_path / "r", rev == e["parent"]
    monkeypatch.setattr(cc, "replay_commit", fake_replay)
    rec = tmp_path / "rec.json"
    r = CliRunner().invoke(cli, ["catalogue", e["id"], "--fork-dir", str(src), "--json", str(rec), "--one-tree"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "built in 12 s (20 CPU-s)" in r.output and "1 compiled (12 s wall, 20 CPU-s), 1 reused" in r.output
    data = json.loads(rec.read_text())
    ent = data["entries"][0]
    assert data["all_match"] and data["one_tree"] and ent["proven"] and ent["parent"]["verdict"] == "FAIL"
    assert ent["parent"]["build_cpu_seconds"] == 20.0 and "build_seconds" not in ent["fix_side"]
    parent_verdict["v"] = Verdict.PASS  # the parent not flagged: a mismatch, exit 1, nothing proven
    r = CliRunner().invoke(cli, ["catalogue", e["id"], "--fork-dir", str(src), "--json", str(rec)], catch_exceptions=False)
    assert r.exit_code == 1 and "MISMATCH" in r.output and not json.loads(rec.read_text())["entries"][0]["proven"]


def test_a_replay_judges_the_backend_it_built_alone(tmp_path, monkeypatch):
    """Another backend of the target (the harness's metal-src host routes of an old commit's Metal source, say) is no
    part of a CPU replay: its cells would decide the verdict of a bug it does not have."""
    import harness.cli_replay as cr
    import harness.targets.fork as tf
    from harness.targets.numpy_target import NumpyTarget
    repo, (c1, _, _) = fake_fork(tmp_path)
    monkeypatch.setattr(cr, "build_commit", lambda fork, c, **kw: (repo, tmp_path / "b", {"cmake_options": [], "reused": True}))
    monkeypatch.setattr(tf, "ForkTarget", lambda bdir, src, env=None: NumpyTarget(
        backends=(("cpu", "cpu"), ("metal", "gpu")), backend_faults={"metal": {"zero_indices"}}))
    run, _, built = cr.replay_commit(repo, c1, ["PQ1"], ["turbo3"], None, out=tmp_path / "r", log=lambda s: None)
    paths = {c.path.split(":")[0] for c in run.checks[0].cells}
    assert paths == {"cpu"} and run.checks[0].verdict.value == "PASS" and not built


def test_a_replay_from_exported_sources_runs_without_git(tmp_path, monkeypatch):
    """The whole replay path (resolve, export, build, checks, report labels) with a sources folder and no git on PATH."""
    import harness.cli_replay as cr
    import harness.targets.fork as tf
    from harness.targets.numpy_target import NumpyTarget
    repo, (c1, _, _) = fake_fork(tmp_path)
    out = tmp_path / "sources"
    rs.export_tarballs(repo, [c1], out, log=lambda s: None)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("TURBO_REPLAY_CACHE", str(tmp_path / "cache"))
    seen = {}

    def fake_build(fork, c, **kw):
        seen["src"] = export_source(fork, c, tmp_path / "cache")
        return seen["src"], tmp_path / "b", {"cmake_options": [], "reused": True}
    monkeypatch.setattr(cr, "build_commit", fake_build)
    monkeypatch.setattr(tf, "ForkTarget", lambda bdir, src, env=None: NumpyTarget())
    run, run_dir, _ = cr.replay_commit(rs.history_dir(str(out)), c1[:10], ["PQ4"], ["turbo3"], None, out=tmp_path / "r",
                                       log=lambda s: None)
    assert run.meta["fork_commit"] == c1 and run.meta["fork_describe"].endswith("first"), run.meta
    assert (seen["src"] / "ggml" / "include" / "ggml.h").is_file() and (run_dir / "summary.md").is_file()
