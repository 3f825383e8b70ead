"""The fork's ``test-backend-ops`` compiled by the harness against ggml alone.

The fork's CMake target links ``test-backend-ops`` with libllama and llama-common (every test of llama.cpp's
``tests/`` does), so asking CMake for it compiles about 200 more files than ``verify`` needs, although the source
includes only ggml's headers. When that holds for the checkout, the harness compiles the fork's own
``tests/test-backend-ops.cpp``, unchanged, with the compiler, defines and optimisation the CMake build uses
(``-O3 -DNDEBUG``, ``GGML_SHARED``, ``GGML_BACKEND_SHARED``) and links it with the build's ggml libraries only, into
``<build>/bin/test-backend-ops`` where the CMake target would have put it. A source that includes anything else
(a later fork version) is built through CMake as before.

ccache: the compile runs in the checkout folder with paths relative to it and ``CCACHE_BASEDIR`` at the checkout, so
what ccache hashes names no build folder and no folder the harness was started in: a second build folder anywhere
(``TURBO_BUILD_ROOT=/tmp/x``), or a clone of the same source in another folder, gets the object from the cache.
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
    """The compile command (the CMake build's flags for this file; ``-c``, so that ccache can keep the object), to be
    run in the checkout folder ``fork`` (source and include paths relative to it; the object's path is absolute and
    ccache does not hash it), and the link command (the build's ggml libraries only)."""
    libdir = (Path(bdir) / "bin").resolve()
    obj = (Path(bdir) / "turbo-probe" / "test-backend-ops.o").resolve()
    compile_ = [*(["ccache"] if ccache else []), cxx, "-O3", "-DNDEBUG", "-std=gnu++17", "-DGGML_SHARED",
                "-DGGML_BACKEND_SHARED", "-pthread", "-c", str(SOURCE), f"-I{Path('ggml') / 'include'}",
                "-o", str(obj)]
    link = [cxx, "-pthread", str(obj), f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lggml", "-lggml-base",
            "-o", str(libdir / "test-backend-ops")]
    return [compile_, link]


# runs a command in a folder (the progress runner starts commands where the harness runs): argv[1] folder, argv[2:]
# (exec: the command keeps the process, so stopping it stops the compiler)
_IN_FOLDER = "import os, sys; os.chdir(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"


def _step(cmd: list[str], logf: Path, log, env, stop=None, cwd: Path | None = None) -> tuple[int, float]:
    """Run one compile or link command (in folder ``cwd`` when given) into its own log, with progress every 30 s:
    (exit code, seconds). ``stop`` (a threading.Event) set by another thread stops the command
    (:func:`harness.fork.progress.run_with_progress`)."""
    import sys
    from harness.fork.progress import run_with_progress
    with open(logf, "a") as lf:
        lf.write("\n=== " + (f"(in {cwd}) " if cwd else "") + " ".join(cmd) + "\n")
        lf.flush()
        run = [sys.executable, "-c", _IN_FOLDER, str(cwd), *cmd] if cwd else cmd
        rc, _, secs = run_with_progress(run, "test-backend-ops", lf, log, env=env, stop=stop)
    return rc, secs


def _failed(logf: Path) -> HarnessError:
    text = logf.read_text(errors="replace").split("\n=== ")[-1]
    first = next((ln.strip() for ln in text.splitlines() if "error" in ln), "see the log")[:300]
    return HarnessError(f"compiling test-backend-ops against ggml failed: {first} (full log: {logf})")


def build_backend_ops(fork: Path, bdir: Path, log, env: dict | None = None, cxx: str | None = None,
                      during=None) -> Path:
    """Compile ``test-backend-ops`` against the build's ggml (see the module docstring); progress every 30 s.

    The object needs only ggml's headers, so it compiles while ``during()`` runs (the CMake build of ggml: on 2 cores
    the one large file fills the serial tail of that build); the link waits for the libraries.

    Args:
        fork: the checkout; bdir: a build folder whose ``bin/`` holds libggml once ``during`` returns.
        log: one line per step. env: environment of the compile (ccache's).
        cxx: C++ compiler (default the CMake build's, else $CXX, c++). during: called while the object compiles.
    Returns:
        ``<bdir>/bin/test-backend-ops``.
    Raises:
        HarnessError: no C++ compiler, or the compile or link failed (its first error quoted, the log named); an
            error of ``during`` is raised as it is (after the compile has finished; an interruption, a
            BaseException such as KeyboardInterrupt, stops the compile first).
    """
    import threading
    cxx = cxx or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise HarnessError("no C++ compiler found for test-backend-ops: install g++ or clang++, or set CXX")
    ccache = bool(shutil.which("ccache")) and os.environ.get("TURBO_CCACHE", "1") != "0"
    compile_, link = compile_commands(fork, bdir, cxx, ccache)
    obj, out = Path(compile_[-1]), Path(link[-1])
    logf = Path(bdir) / "turbo-harness-build-test-backend-ops.log"
    stamp = Path(bdir) / "bin" / ".test-backend-ops.cmd"
    fork = Path(fork).resolve()
    # ccache or not: the same; the checkout folder is part of it (the compile's paths are relative to it)
    said = f"cd {fork}\n" + "\n".join(" ".join(c[1:] if c[0] == "ccache" else c) for c in (compile_, link))
    src = Path(fork) / SOURCE
    # the object depends on the source and on ggml's headers (type ids, op enums, structs): a checkout that moved to
    # a commit changing only a header must not link the old object against the new libraries
    inputs = [src, *sorted((Path(fork) / "ggml" / "include").glob("*.h"))]
    obj_fresh = stamp.is_file() and stamp.read_text() == said and obj.is_file() \
        and obj.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)
    result: dict = {}
    worker = None
    stop, done = threading.Event(), threading.Event()  # done: the worker's compile has ended (see below)

    def compile_in_worker():
        try:
            result.update(zip(("rc", "secs"), _step(compile_, logf, log, cenv, stop=stop, cwd=fork)))
        finally:
            done.set()
    if not obj_fresh:
        obj.parent.mkdir(parents=True, exist_ok=True)
        log("compiling test-backend-ops against ggml alone (its CMake target would also build libllama and "
            "llama-common, which it does not use) ...")
        # ccache's base at the checkout, the compile in it: the hashed paths are 'tests/...', 'ggml/include'
        cenv = {**(env if env is not None else os.environ), "CCACHE_BASEDIR": str(fork), "CCACHE_NOHASHDIR": "1"}
        worker = threading.Thread(target=compile_in_worker)
        worker.start()
    try:
        if during is not None:
            during()
    except Exception:
        raise
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the compile is stopped, not waited for (minutes on 2 cores)
        stop.set()
        raise
    finally:
        if worker is not None:
            try:
                worker.join()
            except BaseException:  # interrupted while waiting for the compile (``during`` had returned): stop it too.
                stop.set()        # Not join() again: an interrupted join marks the thread finished though it runs
                done.wait()       # (CPython bpo-45274's fix), so a second join returns at once and the compile is
                raise             # left running after the harness exits
    if worker is not None and result.get("rc") != 0:
        raise _failed(logf)
    libs = sorted((Path(bdir) / "bin").glob("libggml*"))
    if worker is None and out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for p in [obj, *libs]):
        return out  # up to date: the same commands, newer than the source and the libraries
    rc, _ = _step(link, logf, log, env)
    if rc != 0:
        raise _failed(logf)
    stamp.write_text(said)
    if result.get("secs", 0) >= 30:
        log(f"  compiled test-backend-ops in {result['secs']:.0f} s")
    return out
