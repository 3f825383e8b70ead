"""CMake helpers of :mod:`harness.fork.build`: the compiler launcher (ccache) and its environment, reading a build
folder's CMakeCache.txt, the compiler's version line, and the first error of a configure or build log."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def launcher_options(backend: str, opts: list[str]) -> list[str]:
    """ccache as the compiler launcher when installed (``TURBO_CCACHE=0`` turns it off) and ``opts`` set none:
    a rebuild of sources compiled before (another clone, another build folder, a replayed commit) is mostly hits."""
    if os.environ.get("TURBO_CCACHE", "1") == "0" or not shutil.which("ccache") or any("LAUNCHER" in o for o in opts):
        return []
    langs = ["C", "CXX"] + (["CUDA"] if backend == "cuda" else [])
    return [f"-DCMAKE_{lang}_COMPILER_LAUNCHER=ccache" for lang in langs]


def ccache_env(env: dict, fork: Path, bdir: Path) -> dict:
    """The environment of a build that uses ccache: ``CMAKE_C_COMPILER_LAUNCHER`` and ``CMAKE_CXX_COMPILER_LAUNCHER``
    set to ccache (unless set), CMake's default launcher for every project it configures from this environment, so
    that the projects a build configures itself get it too (ggml-vulkan's ExternalProject ``vulkan-shaders-gen``,
    which the main project's ``-D`` options do not reach: 12 s of a warm Vulkan build otherwise); and
    CCACHE_BASEDIR (unless set) at the folder holding both the source and the build, so that the cache hits across
    clones in other folders (compile lines then name relative paths)."""
    env = dict(env)
    for lang in ("C", "CXX"):
        env.setdefault(f"CMAKE_{lang}_COMPILER_LAUNCHER", "ccache")
    if "CCACHE_BASEDIR" in env:
        return env
    base = os.path.commonpath([str(Path(fork).resolve()), str(Path(bdir).resolve())])
    return dict(env, CCACHE_BASEDIR=base, CCACHE_NOHASHDIR="1") if base != os.sep else env


def compiler_version(cc: str) -> str:
    """The first line of ``cc --version`` ('c++ (Debian 12.2.0-14) 12.2.0'); ``cc`` itself when it cannot be run."""
    try:
        r = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20)
        return r.stdout.splitlines()[0] if r.stdout else cc
    except (OSError, subprocess.TimeoutExpired):
        return cc


def cmake_error(logf: Path) -> str:
    """The first 'CMake Error' message of the last configure in a log, with its next line."""
    lines = logf.read_text(errors="replace").split("=== ")[-1].splitlines()
    for i, ln in enumerate(lines):
        if "CMake Error" in ln:
            nxt = next((x.strip() for x in lines[i + 1:i + 4] if x.strip()), "")
            return f"{ln.strip()} {nxt}"[:300]
    return "see the log"


def tail_errors(logf: Path) -> str:
    """The first line of a build log that mentions an error (else its last line), at most 300 characters."""
    lines = logf.read_text(errors="replace").splitlines()
    errs = [ln.strip() for ln in lines if "error" in ln.lower()]
    return (errs[0] if errs else (lines[-1] if lines else "no output"))[:300]


def read_cmake_cache(bdir: Path) -> dict:
    """A build folder's CMakeCache.txt as {name: value} (types dropped); {} when there is none."""
    out = {}
    f = bdir / "CMakeCache.txt"
    if f.is_file():
        for ln in f.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", ln)
            if m:
                out[m.group(1)] = m.group(2)
    return out
