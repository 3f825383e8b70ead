"""Build and drive the native probe (``probe.c`` + ``probe_batch.c``) against a fork build.

The probe library is loaded in a separate worker process (:mod:`harness.fork.probe_worker`) so that
a ggml abort or a segfault in the fork kills the worker, not the harness: the call raises
:class:`~harness.errors.ProbeCrash` and the next call starts a fresh worker.
Protocol: length-prefixed pickles over the worker's stdin and a private copy of its stdout; the
worker's own fd 1 is pointed at stderr so that anything ggml prints cannot corrupt the stream.
The worker keeps one ggml backend per device for its lifetime; :attr:`Probe.counts` counts the calls made.
"""
from __future__ import annotations

import os
import pickle
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.errors import HarnessError, ProbeCrash, Unsupported

PROBE_SRC = Path(__file__).with_name("probe.c")
PROBE_SOURCES = [PROBE_SRC, PROBE_SRC.with_name("probe_batch.c"), PROBE_SRC.with_name("probe.h")]
LIBNAME = "libturbo_probe.dylib" if sys.platform == "darwin" else "libturbo_probe.so"


def wht_nargs(fork: Path) -> int:
    """Number of arguments of ``ggml_turbo_wht`` in the fork's ggml.h (0 when the op is absent)."""
    text = (Path(fork) / "ggml" / "include" / "ggml.h").read_text(errors="replace")
    m = re.search(r"ggml_turbo_wht\s*\(([^;]*?)\)\s*;", text, re.S)
    if not m:
        return 0
    params = re.sub(r"//[^\n]*", "", m.group(1))
    return params.count(",") + 1


def build_probe(bdir: Path, fork: Path, force: bool = False) -> Path:
    """Compile the probe against the fork's headers and the build's ggml shared libraries.

    Args:
        bdir: a fork build folder holding ``bin/libggml*.so`` (or .dylib).
        fork: the fork checkout (for headers).
    Returns:
        Path of the probe shared library, rebuilt when the libs are newer or what it is built from differs (the
        digest of :func:`probe_digest` is kept beside it: a library of another harness version, with other entry
        points, is never taken for this one's because of file times; checkouts of the same harness sharing a build
        root share its probe).
    Raises:
        HarnessError: no compiler, or the compile failed (message quotes the first error).
    """
    bdir = Path(bdir)
    libdir = bdir / "bin"
    out = bdir / "turbo-probe" / LIBNAME
    libs = sorted(libdir.glob("libggml-base.*"))
    if not libs:
        raise HarnessError(f"no ggml libraries in {libdir}: run `make build` first")
    inc = Path(fork) / "ggml" / "include"
    args = ["-shared", "-fPIC", f"-DTP_WHT_NARGS={wht_nargs(fork)}", *(str(p) for p in PROBE_SOURCES[:2]), f"-I{inc}",
            "-lggml", "-lggml-base", "-lggml-cpu"]
    digest = probe_digest(bdir, fork, [a for a in args if not a.startswith("-I") and a not in map(str, PROBE_SOURCES)])
    stamp = out.with_name(out.name + ".sources")
    fresh = out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for p in libs)
    if fresh and not force and stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    compile_c("the native probe", fork, libdir, out, args)
    stamp.write_text(digest + "\n")
    return out


def probe_digest(bdir: Path, fork: Path, flags: list[str]) -> str:
    """SHA-256 (hex) of what the probe library is built from, by content only: the probe's sources, the fork's ggml
    headers (``ggml/include/*.h``), the compile flags without paths (``flags``), the C compiler (``$CC`` or cc, and
    the first line of its ``--version``) and the build's recorded provenance (fork commit, dirty state, diff SHA-256
    and CMake options from ``turbo-harness-build.json``). No absolute path of the harness checkout or of the fork
    enters it: two checkouts of one harness version sharing a build root (``TURBO_BUILD_ROOT``) reuse the probe
    instead of recompiling it in turn."""
    import hashlib
    from harness.fork.provenance import read_build_meta
    h = hashlib.sha256()
    for p in PROBE_SOURCES:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    for p in sorted((Path(fork) / "ggml" / "include").glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(" ".join(flags).encode() + b"\0" + _compiler_id().encode())
    meta = read_build_meta(bdir)
    h.update(repr([meta.get(k) for k in ("fork_commit", "fork_dirty", "fork_diff_sha256", "cmake_options")]).encode())
    return h.hexdigest()


_CC_IDS: dict[str, str] = {}


def _compiler_id() -> str:
    """'<compiler name>: <first line of its --version>' for the C compiler :func:`compile_c` uses (memoised)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang") or ""
    if cc not in _CC_IDS:
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        _CC_IDS[cc] = f"{Path(cc).name}: {(out.splitlines() or ['?'])[0]}"
    return _CC_IDS[cc]


# A one-file compile takes well under a second; a compiler that hangs (a stuck wrapper, a licence server) is stopped.
COMPILE_TIMEOUT_S = 300.0


def compile_c(what: str, fork: Path, libdir: Path, out: Path, args: list[str]) -> Path:
    """Compile a small C source of the harness against a fork build: ``$CC -O2 ARGS -L<libdir> -rpath <libdir> -o out``.

    Args:
        what: named in errors ('the native probe'). fork: the checkout (named in errors). libdir: the build's bin/.
        out: the output file (its folder is created). args: sources, -I, -l and mode flags.
    Returns:
        ``out``.
    Raises:
        HarnessError: no C compiler (set CC), the compiler could not be started or ran past
            :data:`COMPILE_TIMEOUT_S`, or the compile failed (its first error line quoted).
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise HarnessError(f"no C compiler found for {what}: install gcc or clang, or set CC")
    out.parent.mkdir(parents=True, exist_ok=True)
    # compiled under a name of this process and renamed when complete: another process (a parallel test worker, a
    # second command) never loads a half-written file, and an interrupted compile leaves no file that looks up to date
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    cmd = [cc, "-O2", *args, f"-L{libdir}", f"-Wl,-rpath,{Path(libdir).resolve()}", "-o", str(part)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the compiler's own children (cc1, as, ld) hold the pipes too
            proc.communicate()
            raise
        r = subprocess.CompletedProcess(cmd, proc.returncode, "", err)
    except subprocess.TimeoutExpired:
        part.unlink(missing_ok=True)
        raise HarnessError(f"compiling {what} with {cc} took longer than {COMPILE_TIMEOUT_S:g} s and was stopped: "
                           f"check the compiler (set CC)") from None
    except OSError as e:
        raise HarnessError(f"could not run the C compiler {cc} for {what}: {e.strerror or e}: install gcc or clang, "
                           f"or set CC") from None
    if r.returncode != 0:
        part.unlink(missing_ok=True)
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:300])
        raise HarnessError(f"compiling {what} against {fork} failed: {first}")
    os.replace(part, out)
    return out


def build_llama_tool(what: str, src: Path, exe: str, bdir: Path, fork: Path, force: bool = False) -> Path:
    """Compile a small C tool of the harness that runs models through the fork's llama API (the K/V capture tool,
    the greedy-decode tool) into ``<bdir>/turbo-probe/<exe>``, unless the executable is newer than ``src`` and the
    build's libllama.

    Args:
        what: named in errors ('the greedy-decode tool'). src: the C source. exe: the executable's file name.
        bdir: a fork build folder holding ``bin/libllama.so`` (or .dylib). fork: the checkout (``include/llama.h``,
            ``ggml/include``). force: compile even when the executable is up to date.
    Returns:
        Path of the executable.
    Raises:
        HarnessError: libllama not built and not buildable (:func:`harness.fork.build.ensure_built`), or as
            :func:`compile_c`.
    """
    libdir = Path(bdir) / "bin"
    libs = sorted(libdir.glob("libllama.*"))
    if not libs:
        from harness.fork.build import ensure_built, read_build_meta
        if read_build_meta(Path(bdir)):  # a harness build: libllama is built the first time a tool needs it
            ensure_built(Path(bdir), ["llama"])
            libs = sorted(libdir.glob("libllama.*"))
    if not libs:
        raise HarnessError(f"no libllama in {libdir}: build the fork's llama target (`turbo-harness build --targets all`)")
    out = Path(bdir) / "turbo-probe" / exe
    newest = max(p.stat().st_mtime for p in [Path(src), *libs])
    if out.is_file() and not force and out.stat().st_mtime >= newest:
        return out
    return compile_c(what, fork, libdir, out, [str(src), f"-I{Path(fork) / 'include'}",
                                               f"-I{Path(fork) / 'ggml' / 'include'}", "-lllama", "-lggml", "-lggml-base"])


# ----------------------------------------------------------------------------- client side

def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown signal"


class Probe:
    """Client of one probe worker process. Methods mirror the worker's handlers.

    Each call's crash is reported with what that call printed: the worker's stderr goes to a log file
    and a crash quotes only the part written since the call began (a fresh worker then serves the next
    call), never an earlier crash's message.

    Args:
        lib_path: the compiled probe library (:func:`build_probe`).
        timeout_s: seconds one call may take before the worker is killed (ProbeCrash).
        worker: the command that starts a worker (default ``python -m harness.fork.probe_worker lib_path``);
            tests pass a fake that speaks the same protocol.

    Attributes:
        counts: {method: [calls, seconds]} of every call made through this client (answered or not), for benchmarks
            and the run's per-check costs (:func:`harness.verify.run_checks`); a ``batch`` call counts once.
    """

    def __init__(self, lib_path: Path, timeout_s: float = 600.0, env: dict | None = None,
                 worker: list[str] | None = None):
        self.lib_path = str(lib_path)
        self.timeout_s = timeout_s
        self.env = env
        self.worker = list(worker) if worker else [sys.executable, "-m", "harness.fork.probe_worker", self.lib_path]
        self.proc: subprocess.Popen | None = None
        self.errlog = tempfile.NamedTemporaryFile(prefix="turbo-probe-", suffix=".log", delete=False)
        self.crashes: list[str] = []
        self._call_start = 0  # errlog offset where the call in flight began
        self.counts: dict[str, list] = {}

    def _start(self):
        env = dict(os.environ if self.env is None else self.env)
        root = str(Path(__file__).resolve().parents[2])
        env.setdefault("GGML_NO_BACKTRACE", "1")  # no gdb backtrace: slow, and it buries the message
        # ggml's OpenMP threads wait for the next call by sleeping, not spinning: between calls the harness computes
        # its references on the same cores, and the spinning threads took 2.2 of the worker's 3.2 s of CPU in a
        # default verify (load 12, 2 cores). Correctness is unchanged (the same threads compute); only idle waiting.
        env.setdefault("OMP_WAIT_POLICY", "passive")
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(self.worker, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errlog, env=env)

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.stdout.close()  # a worker still answering an abandoned call gets EPIPE and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _last_stderr(self, since: int = 0) -> str:
        """The most telling line the worker wrote to stderr after byte offset ``since`` ('' if none)."""
        try:
            with open(self.errlog.name, "rb") as f:
                f.seek(max(since, os.path.getsize(self.errlog.name) - 4000))
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        interesting = [ln for ln in lines if not ln.lstrip().startswith("#")
                       and re.search(r"GGML_ASSERT|GGML_ABORT|fatal error|error:|abort|Segmentation", ln)]
        return (interesting or lines or [""])[-1].strip()[:300]

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.proc.stdout.read(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def call(self, method: str, *args):
        """Run one probe call. Raises Unsupported, HarnessError or ProbeCrash."""
        t0 = time.monotonic()
        try:
            return self._call(method, *args)
        finally:
            c = self.counts.setdefault(method, [0, 0.0])
            c[0] += 1
            c[1] += time.monotonic() - t0

    def _call(self, method: str, *args):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.errlog.flush()
        self._call_start = os.path.getsize(self.errlog.name)
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
            if not ready:
                self.proc.kill()
                self.proc.wait()
                raise ProbeCrash(f"probe call {method} timed out after {self.timeout_s:.0f} s and was killed")
            hdr = self._read_exact(8)
            if len(hdr) < 8:
                raise EOFError
            (n,) = struct.unpack("<Q", hdr)
            status, payload = pickle.loads(self._read_exact(n))
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            rc = self.proc.wait()
            said = self._last_stderr(self._call_start) or "no message"
            self.proc = None
            if rc >= 0:  # the worker exited instead of dying of a signal: it could not start or serve (harness side)
                raise HarnessError(f"the probe worker exited (exit code {rc}) during call {method}: {said}") from None
            msg = f"fork code crashed in probe call {method} (signal {-rc} ({_signame(-rc)})): {said}"
            self.crashes.append(msg)
            raise ProbeCrash(msg) from None
        if status == "ok":
            return payload
        if status == "unsupported":
            raise Unsupported(payload)
        raise HarnessError(f"probe call {method} failed: {payload}")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a: self.call(name, *a)


if __name__ == "__main__":  # pragma: no cover - the worker's older name
    from harness.fork.probe_worker import serve
    serve(sys.argv[1])
