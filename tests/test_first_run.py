"""Issue 23, the newcomer path: the fork is found the same way everywhere (FORK_DIR, vendor checkout, the remembered
snapshot, a snapshot beside the repository) and remembered for a new shell; build folders are keyed by source;
tools missing from a build are built the first time a command needs them; a build says how far it is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.errors import HarnessError
from harness.fork import build as fb
from harness.fork import locate as L
from harness.fork.progress import Progress, run_with_progress
from tests.test_snapshot import _snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No FORK_DIR, no vendor checkout, a private .cache and a folder of snapshots (empty until a test adds one)."""
    monkeypatch.delenv("FORK_DIR", raising=False)
    monkeypatch.setattr(L, "VENDOR", tmp_path / "no-vendor")
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TURBO_FORKS_DIR", str(tmp_path / "forks"))
    return tmp_path


def _fork(path: Path) -> Path:
    (path / "ggml" / "include").mkdir(parents=True)
    (path / "ggml" / "include" / "ggml.h").write_text("GGML_TYPE_TURBO3_0 = 42,\n")
    return path


def test_fork_dir_wins_and_a_wrong_one_is_one_line(fresh, monkeypatch):
    fork = _fork(fresh / "mine")
    monkeypatch.setenv("FORK_DIR", str(fork))
    assert L.locate() == L.Found(fork.resolve(), "FORK_DIR")
    monkeypatch.setenv("FORK_DIR", str(fresh / "nope"))
    with pytest.raises(HarnessError, match="no fork checkout at .*from FORK_DIR"):
        L.locate()


def test_snapshot_is_unpacked_once_and_remembered_for_a_new_shell(fresh):
    snap, _ = _snapshot(fresh)  # fresh/forks/fork-abc.tar.xz: rename to the name the harness looks for
    named = snap.with_name("llama-cpp-turboquant-abc.tar.xz")
    snap.rename(named)
    (named.parent / "README.md").write_text((named.parent / "README.md").read_text().replace(snap.name, named.name))
    lines = []
    found = L.locate(log=lines.append)
    assert found.source == "snapshot" and found.path == (fresh / "cache" / "fork" / "llama.cpp").resolve()
    assert (fresh / "cache" / "fork-dir").read_text().strip() == str(found.path)
    assert any("remembered" in ln for ln in lines)
    # a new shell (another process, no FORK_DIR) finds the same folder through the memo, without unpacking again
    named.unlink()
    env = {k: v for k, v in os.environ.items() if k != "FORK_DIR"}
    r = subprocess.run([sys.executable, "-c", "import harness.fork.locate as L; L.VENDOR = L.Path('/nonexistent'); "
                        "print(L.locate().describe())"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and str(found.path) in r.stdout and "remembered" in r.stdout, r.stderr


def test_corrupt_snapshot_stops_with_one_line(fresh):
    snap, _ = _snapshot(fresh)
    named = snap.with_name("llama-cpp-turboquant-abc.tar.xz")
    named.write_bytes(snap.read_bytes()[:-8] + b"\0" * 8)
    (named.parent / "README.md").write_text((named.parent / "README.md").read_text().replace(snap.name, named.name))
    snap.unlink()
    with pytest.raises(HarnessError, match="expected .*copy it again"):
        L.locate()
    assert not (fresh / "cache" / "fork-dir").exists()


def test_nothing_found_names_what_works_offline(fresh):
    with pytest.raises(HarnessError) as e:
        L.locate()
    msg = str(e.value)
    assert "FORK_DIR" in msg and "unpack-fork" in msg and "needs network" not in msg.split("unpack-fork")[0]
    # with a snapshot present but unpacking not allowed, the advice is the offline command, not the submodule
    snap, _ = _snapshot(fresh)
    snap.rename(snap.with_name("llama-cpp-turboquant-abc.tar.xz"))
    with pytest.raises(HarnessError) as e:
        L.locate(unpack=False)
    assert "unpack-fork" in str(e.value) and "submodule" not in str(e.value)


def test_doctor_with_a_snapshot_unpacks_it_and_never_suggests_the_submodule(fresh, monkeypatch):
    snap, _ = _snapshot(fresh)
    named = snap.with_name("llama-cpp-turboquant-abc.tar.xz")
    snap.rename(named)
    (named.parent / "README.md").write_text((named.parent / "README.md").read_text().replace(snap.name, named.name))
    monkeypatch.setenv("TURBO_BUILD_ROOT", str(fresh / "build"))
    out = CliRunner().invoke(cli, ["doctor"]).output
    assert "unpacked from" in out and "submodule" not in out, out
    assert "none yet for this fork" in out and "make verify" in out


def test_unpack_fork_command_remembers_the_folder(fresh):
    snap, _ = _snapshot(fresh)
    r = CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(fresh / "d")])
    assert r.exit_code == 0
    assert L.locate() == L.Found((fresh / "d" / "llama.cpp").resolve(), "remembered")


def _built(bdir: Path, fork: Path, commit: str) -> Path:
    (bdir / "bin").mkdir(parents=True)
    (bdir / "bin" / "libggml-base.so").write_text("")
    (bdir / fb.BUILD_META).write_text(json.dumps({"backend": "cpu", "fork_dir": str(fork), "fork_commit": commit,
                                                  "fork_dirty": None, "targets": ["ggml"]}))
    return bdir


def test_build_folder_is_keyed_by_checkout_and_the_first_keeps_its_name(tmp_path):
    a, b = _fork(tmp_path / "a"), _fork(tmp_path / "b")
    (a / ".fork-commit").write_text("1" * 40 + "\n")
    root = tmp_path / "build"
    assert fb.build_dir("cpu", root, fork=a) == root / "cpu"  # empty: the historical name
    _built(root / "cpu", a.resolve(), "1" * 40)
    assert fb.build_dir("cpu", root, fork=a) == root / "cpu"
    kb = fb.build_dir("cpu", root, fork=b)  # a second fork: its own folder, the first is never rebuilt
    assert kb != root / "cpu" and kb.name.startswith("cpu-b-")
    (a / ".fork-commit").write_text("3" * 40 + "\n")  # the same checkout at another commit rebuilds its own folder
    assert fb.build_dir("cpu", root, fork=a) == root / "cpu"
    _built(kb, b.resolve(), "2" * 40)
    assert fb.build_dir("cpu", root, fork=b) == kb  # and the second finds its folder again


FAKE_CMAKE = r"""#!/usr/bin/env python3
import sys, time, os, pathlib
a = sys.argv[1:]
if "-S" in a:
    b = pathlib.Path(a[a.index("-B") + 1]); b.mkdir(parents=True, exist_ok=True)
    (b / "CMakeCache.txt").write_text("GGML_RPC:BOOL=" + ("ON" if "-DGGML_RPC=ON" in a else "OFF") + "\n"
        + "".join(f"{x[2:].split('=')[0]}:STRING=ccache\n" for x in a if "LAUNCHER=ccache" in x))
    with open(b / "calls.txt", "a") as f: f.write("configure\n")
elif "--build" in a:
    b = pathlib.Path(a[a.index("--build") + 1]); ts = [a[i + 1] for i, x in enumerate(a) if x == "--target"]
    for i in range(1, 5):
        print(f"[{i}/4] Building CXX object src/{ts[0]}{i}.o", flush=True); time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
    (b / "bin").mkdir(exist_ok=True)
    for t in ts:
        (b / "bin" / ("libllama.so" if t == "llama" else t)).write_text("")
    with open(b / "calls.txt", "a") as f: f.write(" ".join(ts) + "\n")
"""


@pytest.fixture
def fake_cmake(tmp_path, monkeypatch):
    bin_ = tmp_path / "fakebin"
    bin_.mkdir()
    (bin_ / "cmake").write_text(FAKE_CMAKE)
    (bin_ / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    return bin_


def test_missing_tool_is_built_the_first_time_it_is_needed(tmp_path, fake_cmake, capsys):
    fork = _fork(tmp_path / "f")
    (fork / ".fork-commit").write_text("1" * 40 + "\n")
    bdir = _built(tmp_path / "build" / "cpu", fork, "1" * 40)
    tool = fb.binary(bdir, "llama-perplexity")
    assert tool.is_file()
    err = capsys.readouterr().err
    assert err.count("the first time it is needed") == 1 and "sweep" in err
    assert "llama-perplexity" in fb.read_build_meta(bdir)["targets"]
    fb.binary(bdir, "llama-perplexity")  # the second time: nothing built
    assert (bdir / "calls.txt").read_text().split() == ["llama-perplexity"]


def test_missing_tool_of_a_moved_checkout_is_not_built(tmp_path, fake_cmake):
    fork = _fork(tmp_path / "f")
    (fork / ".fork-commit").write_text("9" * 40 + "\n")  # the checkout moved on since the build
    bdir = _built(tmp_path / "build" / "cpu", fork, "1" * 40)
    with pytest.raises(HarnessError, match="another commit"):
        fb.binary(bdir, "llama-bench")
    assert not (bdir / "calls.txt").exists()


def test_rpc_server_is_not_built_into_a_build_without_rpc(tmp_path, fake_cmake):
    fork = _fork(tmp_path / "f")
    bdir = _built(tmp_path / "build" / "cpu", fork, "1" * 40)
    with pytest.raises(HarnessError, match="--rpc"):
        fb.binary(bdir, "rpc-server")


def test_build_progress_is_printed_during_a_long_build(tmp_path, fake_cmake, monkeypatch):
    monkeypatch.setenv("FAKE_DELAY", "0.4")
    lines = []
    with open(tmp_path / "log", "w") as lf:
        rc, prog, secs = run_with_progress(["cmake", "--build", str(tmp_path), "--target", "ggml"], "ggml", lf,
                                           lines.append, every_s=0.5)
    assert rc == 0 and prog.done == 4 and prog.total == 4 and prog.compiled == 4
    assert lines and all(ln.startswith("  ... ggml: ") and ln.endswith(" s") for ln in lines), lines
    assert any("/4 build steps (" in ln for ln in lines), lines
    assert "Building CXX object" in (tmp_path / "log").read_text()


def test_progress_reads_makefile_output_too():
    p = Progress()
    for ln in ["[  3%] Building C object ggml/src/ggml.c.o", "[ 41%] Building CXX object ggml/src/x.cpp.o",
               "[ 41%] Linking CXX shared library libggml.so"]:
        p.feed(ln)
    assert p.describe() == "2 compile units, 41%"


def test_a_rebuild_with_the_same_options_skips_the_configure_step(tmp_path, fake_cmake):
    fork = _fork(tmp_path / "f")
    bdir = tmp_path / "build" / "cpu"
    fb.build("cpu", ["ggml"], fork=fork, bdir=bdir, log=lambda s: None)
    fb.build("cpu", ["ggml"], fork=fork, bdir=bdir, log=lambda s: None)
    assert (bdir / "calls.txt").read_text().split() == ["configure", "ggml", "ggml"]
    res = fb.build("cpu", ["ggml"], fork=fork, bdir=bdir, log=lambda s: None, rpc=True)  # new options: configured
    assert (bdir / "calls.txt").read_text().splitlines()[3:] == ["configure", "ggml rpc-server"]
    assert res.meta["rpc"] is True and "ggml" in res.meta["targets"]


def test_ccache_is_the_launcher_of_a_new_folder_only(tmp_path, fake_cmake, monkeypatch):
    monkeypatch.delenv("TURBO_CCACHE", raising=False)
    if not fb.shutil.which("ccache"):
        pytest.skip("ccache not installed on this machine")
    fork = _fork(tmp_path / "f")
    new = fb.build("cpu", ["ggml"], fork=fork, bdir=tmp_path / "new", log=lambda s: None)
    assert new.meta["ccache"] and any("LAUNCHER=ccache" in o for o in new.meta["configured_with"])
    assert not any("LAUNCHER" in o for o in new.meta["cmake_options"])  # not part of what identifies a build
    old = tmp_path / "old"
    old.mkdir()
    (old / "CMakeCache.txt").write_text("GGML_RPC:BOOL=OFF\n")  # configured before, without a launcher
    res = fb.build("cpu", ["ggml"], fork=fork, bdir=old, log=lambda s: None)
    assert not res.meta["ccache"]


FAKE_CXX = r"""#!/usr/bin/env python3
import sys, pathlib
a = sys.argv[1:]
out = pathlib.Path(a[a.index("-o") + 1]); out.write_text("#!/bin/sh\n"); out.chmod(0o755)
with open(out.parent.parent / "calls.txt", "a") as f: f.write("c++ " + ("-c" if "-c" in a else "link") + "\n")
"""


def test_backend_ops_is_compiled_against_ggml_alone_once(tmp_path, fake_cmake, monkeypatch):
    """Its CMake target drags libllama and llama-common in (about 200 files for a source that includes only ggml)."""
    (fake_cmake / "fakecxx").write_text(FAKE_CXX)
    (fake_cmake / "fakecxx").chmod(0o755)
    monkeypatch.setenv("CXX", str(fake_cmake / "fakecxx"))
    monkeypatch.setenv("TURBO_CCACHE", "0")
    fork = _fork(tmp_path / "f")
    (fork / "tests").mkdir()
    (fork / "tests" / "test-backend-ops.cpp").write_text("#include <ggml.h>\n#include <ggml-backend.h>\n#include <vector>\n")
    bdir = tmp_path / "build" / "cpu"
    res = fb.build("cpu", None, fork=fork, bdir=bdir, log=lambda s: None)
    calls = (bdir / "calls.txt").read_text().splitlines()
    # the object compiles beside the CMake build of ggml (either may finish first); the link comes after both
    assert calls[0] == "configure" and sorted(calls[1:3]) == ["c++ -c", "ggml"] and calls[3:] == ["c++ link"]
    assert "test-backend-ops" in res.meta["targets"] and (bdir / "bin" / "test-backend-ops").is_file()
    fb.build("cpu", None, fork=fork, bdir=bdir, log=lambda s: None)  # up to date: not compiled again
    assert (bdir / "calls.txt").read_text().splitlines()[4:] == ["ggml"]
    # a source that needs more than ggml goes through its CMake target
    (fork / "tests" / "test-backend-ops.cpp").write_text('#include <ggml.h>\n#include "common.h"\n')
    fb.build("cpu", None, fork=fork, bdir=tmp_path / "b2", log=lambda s: None)
    assert (tmp_path / "b2" / "calls.txt").read_text().splitlines() == ["configure", "ggml test-backend-ops"]


def test_a_failed_backend_ops_compile_is_one_line_naming_its_log(tmp_path, fake_cmake, monkeypatch):
    (fake_cmake / "badcxx").write_text("#!/bin/sh\necho 'test-backend-ops.cpp:1:1: error: boom' >&2\nexit 1\n")
    (fake_cmake / "badcxx").chmod(0o755)
    monkeypatch.setenv("CXX", str(fake_cmake / "badcxx"))
    monkeypatch.setenv("TURBO_CCACHE", "0")
    fork = _fork(tmp_path / "f")
    (fork / "tests").mkdir()
    (fork / "tests" / "test-backend-ops.cpp").write_text("#include <ggml.h>\n")
    with pytest.raises(HarnessError, match=r"test-backend-ops against ggml failed: .*error: boom .*full log"):
        fb.build("cpu", None, fork=fork, bdir=tmp_path / "b", log=lambda s: None)
    assert not (tmp_path / "b" / "bin" / "test-backend-ops").exists()


def test_tools_built_from_an_earlier_commit_are_rebuilt_when_the_folder_moves_to_another(tmp_path, fake_cmake):
    """One checkout that moves to another commit rebuilds its own folder incrementally. `build` (ggml only) used to
    leave llama-perplexity and libllama from the old commit in bin/ while the record named the new one: the sweep then
    measured the old commit's llama under the new commit's name."""
    fork = _fork(tmp_path / "f")
    (fork / ".fork-commit").write_text("1" * 40 + "\n")
    bdir = tmp_path / "build" / "cpu"
    fb.build("cpu", ["ggml", "llama-perplexity", "llama"], fork=fork, bdir=bdir, log=lambda s: None)
    fb.build("cpu", ["ggml"], fork=fork, bdir=bdir, log=lambda s: None)  # the same commit: ggml only
    assert (bdir / "calls.txt").read_text().splitlines()[1:] == ["ggml llama-perplexity llama", "ggml"]
    (fork / ".fork-commit").write_text("2" * 40 + "\n")  # the checkout moved on
    lines = []
    res = fb.build("cpu", ["ggml"], fork=fork, bdir=bdir, log=lines.append)
    last = (bdir / "calls.txt").read_text().splitlines()[-1].split()
    assert sorted(last) == ["ggml", "llama", "llama-perplexity"], last
    assert res.meta["fork_commit"] == "2" * 40 and any("rebuilt too" in ln for ln in lines), lines


def test_backend_ops_object_is_compiled_again_when_a_ggml_header_changes(tmp_path, fake_cmake, monkeypatch):
    """The object includes ggml's headers (type ids, op enums): a commit that changes only ggml.h left the old object,
    linked against the new libraries (test-backend-ops then tests other type ids than it names)."""
    (fake_cmake / "fakecxx").write_text(FAKE_CXX)
    (fake_cmake / "fakecxx").chmod(0o755)
    monkeypatch.setenv("CXX", str(fake_cmake / "fakecxx"))
    monkeypatch.setenv("TURBO_CCACHE", "0")
    fork = _fork(tmp_path / "f")
    (fork / "tests").mkdir()
    (fork / "tests" / "test-backend-ops.cpp").write_text("#include <ggml.h>\n")
    bdir = tmp_path / "build" / "cpu"
    fb.build("cpu", None, fork=fork, bdir=bdir, log=lambda s: None)
    obj = bdir / "turbo-probe" / "test-backend-ops.o"
    later = obj.stat().st_mtime + 10
    os.utime(fork / "ggml" / "include" / "ggml.h", (later, later))  # only the header changed
    fb.build("cpu", None, fork=fork, bdir=bdir, log=lambda s: None)
    again = (bdir / "calls.txt").read_text().splitlines()[4:]
    assert sorted(again[:2]) == ["c++ -c", "ggml"] and again[2:] == ["c++ link"], again
