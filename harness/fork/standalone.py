"""The fork's ``test-backend-ops`` compiled by the harness against ggml alone.

The fork's CMake target links ``test-backend-ops`` with libllama and llama-common (every test of llama.cpp's
``tests/`` does), so asking CMake for it compiles about 200 more files than ``verify`` needs, although the source
includes only ggml's headers. When that holds for the checkout, the harness compiles the fork's own
``tests/test-backend-ops.cpp``, unchanged, with the compiler, defines and optimisation the CMake build uses
(``-O3 -DNDEBUG``, ``GGML_SHARED``, ``GGML_BACKEND_SHARED``) and links it with the build's ggml libraries only, into
``<build>/bin/test-backend-ops`` where the CMake target would have put it. A source that includes anything else
(a later fork version) is built through CMake as before.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from harness.errors import HarnessError

SOURCE = Path("tests") / "test-backend-ops.cpp"
# headers the source may include for the ggml-only compile: ggml's own and the standard library's
_OWN = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def ggml_only(fork: Path) -> bool:
    """True when the fork's test-backend-ops.cpp includes no project header but ggml's (``ggml*.h``)."""
    src = Path(fork) / SOURCE
    if not src.is_file():
        return False
    for inc in _OWN.findall(src.read_text(errors="replace")):
        if "/" in inc or "." in inc and not inc.startswith("ggml"):
            return False
    return True


def compile_commands(fork: Path, bdir: Path, cxx: str, ccache: bool) -> list[list[str]]:
    """The compile command (the CMake build's flags for this file; ``-c``, so that ccache can keep the object) and
    the link command (the build's ggml libraries only)."""
    libdir = (Path(bdir) / "bin").resolve()
    obj = (Path(bdir) / "turbo-probe" / "test-backend-ops.o").resolve()
    compile_ = [*(["ccache"] if ccache else []), cxx, "-O3", "-DNDEBUG", "-std=gnu++17", "-DGGML_SHARED",
                "-DGGML_BACKEND_SHARED", "-pthread", "-c", str(Path(fork) / SOURCE),
                f"-I{Path(fork) / 'ggml' / 'include'}", "-o", str(obj)]
    link = [cxx, "-pthread", str(obj), f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lggml", "-lggml-base",
            "-o", str(libdir / "test-backend-ops")]
    return [compile_, link]


def build_backend_ops(fork: Path, bdir: Path, log, env: dict | None = None, cxx: str | None = None) -> Path:
    """Compile ``test-backend-ops`` against the build's ggml (see the module docstring); progress every 30 s.

    Args:
        fork: the checkout; bdir: a build folder whose ``bin/`` holds libggml. log: one line per step.
        env: environment of the compile (ccache's); cxx: C++ compiler (default the CMake build's, else $CXX, c++).
    Returns:
        ``<bdir>/bin/test-backend-ops``.
    Raises:
        HarnessError: no C++ compiler, or the compile failed (its first error quoted, the log named).
    """
    from harness.fork.progress import run_with_progress
    cxx = cxx or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise HarnessError("no C++ compiler found for test-backend-ops: install g++ or clang++, or set CXX")
    ccache = bool(shutil.which("ccache")) and os.environ.get("TURBO_CCACHE", "1") != "0"
    cmds = compile_commands(fork, bdir, cxx, ccache)
    out = Path(bdir) / "bin" / "test-backend-ops"
    stamp = Path(bdir) / "bin" / ".test-backend-ops.cmd"
    said = "\n".join(" ".join(c[1:] if c[0] == "ccache" else c) for c in cmds)  # with or without ccache: the same
    inputs = [Path(fork) / SOURCE, *sorted((Path(bdir) / "bin").glob("libggml*"))]
    if out.is_file() and stamp.is_file() and stamp.read_text() == said \
            and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return out  # up to date: compiled with the same command, newer than the source and the libraries
    logf = Path(bdir) / "turbo-harness-build.log"
    (Path(bdir) / "turbo-probe").mkdir(parents=True, exist_ok=True)
    log("compiling test-backend-ops against ggml alone (its CMake target would also build libllama and llama-common, "
        "which it does not use) ...")
    secs = 0.0
    for cmd in cmds:
        with open(logf, "a") as lf:
            lf.write("\n=== " + " ".join(cmd) + "\n")
            lf.flush()
            rc, _, t = run_with_progress(cmd, "test-backend-ops", lf, log, env=env)
        secs += t
        if rc != 0:
            text = logf.read_text(errors="replace").split("\n=== ")[-1]
            first = next((ln.strip() for ln in text.splitlines() if "error" in ln), "see the log")[:300]
            raise HarnessError(f"compiling test-backend-ops against ggml failed: {first} (full log: {logf})")
    stamp.write_text(said)
    if secs >= 30:
        log(f"  compiled test-backend-ops in {secs:.0f} s")
    return out
