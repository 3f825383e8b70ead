"""test-backend-ops' own compile (harness/fork/standalone.py) is a ccache hit in any second build folder of the same
fork source: a fresh `TURBO_BUILD_ROOT=/tmp/x turbo-harness build` compiled it for 51 s although the README promised
2 s from ccache. The compile's CCACHE_BASEDIR came from the build folder (the folder holding it and the source, none
for /tmp/x) and ccache made paths relative to whatever folder the harness ran in, so another build root or another
working folder hashed other paths. Real ccache with a private cache folder, a toy fork and toy ggml libraries."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.fork import standalone
from harness.fork.cmake_util import ccache_env

pytestmark = pytest.mark.skipif(not (shutil.which("ccache") and shutil.which("c++") and shutil.which("cc")),
                                reason="needs ccache, c++ and cc")


def _toy_fork(root: Path) -> Path:
    fork = root / "fork"
    (fork / "tests").mkdir(parents=True)
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "ggml" / "include" / "ggml.h").write_text("#pragma once\nint ggml_toy(void);\n")
    (fork / standalone.SOURCE).write_text('#include "ggml.h"\n#include <cstdio>\nint main() { std::puts("ok"); }\n')
    return fork


def _toy_build(bdir: Path) -> Path:
    (bdir / "bin").mkdir(parents=True)
    src = bdir / "empty.c"
    src.write_text("int ggml_toy(void) { return 0; }\n")
    for lib in ("libggml.so", "libggml-base.so"):
        subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(bdir / "bin" / lib)], check=True)
    return bdir


def _hits(cache: Path) -> int:
    out = subprocess.run(["ccache", "--print-stats"], env={**os.environ, "CCACHE_DIR": str(cache)},
                         capture_output=True, text=True, check=True).stdout
    stats = dict(ln.split("\t", 1) for ln in out.splitlines() if "\t" in ln)
    return int(stats.get("direct_cache_hit", 0)) + int(stats.get("preprocessed_cache_hit", 0))


def _build(fork: Path, bdir: Path, cache: Path, cwd: Path, monkeypatch) -> Path:
    monkeypatch.chdir(cwd)  # the folder the harness was started in
    monkeypatch.delenv("CCACHE_BASEDIR", raising=False)
    monkeypatch.setenv("TURBO_CCACHE", "1")
    env = ccache_env({**os.environ, "CCACHE_DIR": str(cache)}, fork, bdir)  # as harness/fork/build.py gives it
    return standalone.build_backend_ops(fork, bdir, log=lambda s: None, env=env, cxx=shutil.which("c++"))


def test_a_second_build_folder_elsewhere_or_from_another_folder_hits_the_cache(tmp_path, monkeypatch):
    fork, cache = _toy_fork(tmp_path / "src"), tmp_path / "ccache"
    (tmp_path / "a" / "deep").mkdir(parents=True)
    exe = _build(fork, _toy_build(tmp_path / "src" / "build" / "cpu"), cache, tmp_path / "a", monkeypatch)
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout == "ok\n"
    h0 = _hits(cache)
    # the same source, another build folder beside the first, the harness started from another folder
    _build(fork, _toy_build(tmp_path / "src" / "build" / "cpu2"), cache, tmp_path / "a" / "deep", monkeypatch)
    assert _hits(cache) == h0 + 1
    # a build root outside the folder holding the source (the tryout's TURBO_BUILD_ROOT=/tmp/x: no common base
    # below '/'), here /var/tmp beside /tmp where the system has it
    other = Path(tempfile.mkdtemp(dir="/var/tmp")) if os.access("/var/tmp", os.W_OK) else None
    if other is None:
        pytest.skip("no writable /var/tmp for a build root outside the source's folder")
    try:
        assert os.path.commonpath([str(fork.resolve()), str(other.resolve())]) == os.sep
        _build(fork, _toy_build(other / "cpu"), cache, tmp_path, monkeypatch)
        assert _hits(cache) == h0 + 2
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_the_object_is_rebuilt_for_another_checkout_folder(tmp_path, monkeypatch):
    """Paths relative to the checkout must not make the object of one checkout folder 'fresh' for another."""
    cache, bdir = tmp_path / "ccache", _toy_build(tmp_path / "build" / "cpu")
    one, two = _toy_fork(tmp_path / "one"), _toy_fork(tmp_path / "two")
    _build(one, bdir, cache, tmp_path, monkeypatch)
    stamp = (bdir / "bin" / ".test-backend-ops.cmd").read_text()
    _build(two, bdir, cache, tmp_path, monkeypatch)
    assert (bdir / "bin" / ".test-backend-ops.cmd").read_text() != stamp  # another command: compiled and linked again
