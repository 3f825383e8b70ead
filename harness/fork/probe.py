"""Build and drive the native probe (``probe.c``) against a fork build.

The probe library is loaded in a separate worker process (``python -m harness.fork.probe``) so that
a ggml abort or a segfault in the fork kills the worker, not the harness: the call raises
:class:`~harness.errors.ProbeCrash` and the next call starts a fresh worker.
Protocol: length-prefixed pickles over the worker's stdin and a private copy of its stdout; the
worker's own fd 1 is pointed at stderr so that anything ggml prints cannot corrupt the stream.
"""
from __future__ import annotations

import ctypes
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
from pathlib import Path

import numpy as np

from harness.errors import HarnessError, ProbeCrash, Unsupported

PROBE_SRC = Path(__file__).with_name("probe.c")
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
        Path of the probe shared library (rebuilt only when probe.c or the libs are newer).
    Raises:
        HarnessError: no compiler, or the compile failed (message quotes the first error).
    """
    bdir = Path(bdir)
    libdir = bdir / "bin"
    out = bdir / "turbo-probe" / LIBNAME
    libs = sorted(libdir.glob("libggml-base.*"))
    if not libs:
        raise HarnessError(f"no ggml libraries in {libdir}: run `make build` first")
    newest = max(p.stat().st_mtime for p in [PROBE_SRC, *libs])
    if out.is_file() and not force and out.stat().st_mtime >= newest:
        return out
    inc = Path(fork) / "ggml" / "include"
    return compile_c("the native probe", fork, libdir, out,
                     ["-shared", "-fPIC", f"-DTP_WHT_NARGS={wht_nargs(fork)}", str(PROBE_SRC), f"-I{inc}",
                      "-lggml", "-lggml-base", "-lggml-cpu"])


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


# ----------------------------------------------------------------------------- worker side

def _serve(lib_path: str) -> None:  # pragma: no cover - runs in the worker process
    # Ctrl-C reaches the whole process group: the harness handles it (partial report) and closes this
    # worker; dying here first would make the call in flight look like a fork crash
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer
    lib = ctypes.CDLL(lib_path)
    I64, P, F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.tp_last_error.restype = ctypes.c_char_p
    for fn in ("tp_dev_name", "tp_dev_description", "tp_dev_reg_name", "tp_type_name"):
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.tp_type_size.restype = I64
    lib.tp_blck_size.restype = I64
    lib.tp_dev_memory_total.restype = I64
    lib.tp_alloc_size.restype = I64

    # remote devices (harness/fork/rpc.py): each rpc-server named in the environment joins the registry before
    # the first call, strictly in endpoint order in every worker, so 'RPC0' names the same device in a fresh worker
    from harness.fork.rpc import RegistryJoin

    def _add(ep):
        return None if lib.tp_rpc_add(ep.encode()) >= 0 else lib.tp_last_error().decode(errors="replace")
    rpc_join = RegistryJoin(os.environ.get("TURBO_PROBE_RPC", "").split(","), _add)

    def on_device(dev):
        """The device name for ggml; a remote one while an rpc-server cannot be reached raises (one line). A server
        that was down when this worker started is tried again (it may have been restarted since), and the ones
        after it only then (:class:`harness.fork.rpc.RegistryJoin`)."""
        if dev.startswith("RPC") and not rpc_join.join():
            raise RuntimeError("; ".join(f"{msg}" for msg in rpc_join.down.values()))
        return dev.encode()

    def ptr(a):
        return a.ctypes.data_as(P)

    def check(rc, what):
        if rc == 0:
            return
        msg = lib.tp_last_error().decode(errors="replace") or what
        raise (Unsupported if rc == 1 else HarnessError)(msg)

    def type_id(name):
        t = lib.tp_type_by_name(name.encode())
        if t < 0:
            raise Unsupported(f"this fork build has no ggml type named {name!r}")
        return t

    def row_size(t, ncols):
        return ncols // lib.tp_blck_size(t) * lib.tp_type_size(t)

    def devices():
        return [{"name": lib.tp_dev_name(i).decode(), "description": lib.tp_dev_description(i).decode(),
                 "reg": lib.tp_dev_reg_name(i).decode(), "kind": ["cpu", "gpu", "accel", "igpu"][lib.tp_dev_type(i)],
                 "memory_total": int(lib.tp_dev_memory_total(i))}
                for i in range(lib.tp_dev_count())]

    def rpc_status():
        return rpc_join.status()

    def alloc_size(dev, tname, ne0, ne1):
        n = lib.tp_alloc_size(on_device(dev), type_id(tname), I64(ne0), I64(ne1))
        if n < 0:
            raise HarnessError(lib.tp_last_error().decode(errors="replace"))
        return int(n)

    def row_bytes(tname, ncols):
        return int(row_size(type_id(tname), ncols))

    def type_info(name):
        t = lib.tp_type_by_name(name.encode())
        if t < 0:
            return None
        return {"id": t, "block_size": lib.tp_blck_size(t), "type_size": lib.tp_type_size(t)}

    def set_rows(dev, tname, x):
        t = type_id(tname)
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(x.shape[0] * row_size(t, x.shape[1]), np.uint8)
        check(lib.tp_set_rows(on_device(dev), t, ptr(x), I64(x.shape[0]), I64(x.shape[1]), ptr(out)), "set_rows")
        return out

    def quantize_chunk(tname, x):
        t = type_id(tname)
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(x.shape[0] * row_size(t, x.shape[1]), np.uint8)
        check(lib.tp_quantize_chunk(t, ptr(x), I64(x.shape[0]), I64(x.shape[1]), ptr(out)), "quantize_chunk")
        return out

    def to_float(tname, raw, n):
        t = type_id(tname)
        raw = np.ascontiguousarray(raw, np.uint8)
        out = np.zeros(n, np.float32)
        check(lib.tp_to_float(t, ptr(raw), I64(n), ptr(out)), "to_float")
        return out

    def decode(dev, tname, raw, nrows, ncols, route):
        t = type_id(tname)
        raw = np.ascontiguousarray(raw, np.uint8)
        out = np.zeros(nrows * ncols, np.float32)
        check(lib.tp_decode(on_device(dev), t, ptr(raw), I64(nrows), I64(ncols), int(route), ptr(out)), "decode")
        return out.reshape(nrows, ncols)

    def turbo_wht(dev, x, direction, group):
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros_like(x)
        check(lib.tp_turbo_wht(on_device(dev), ptr(x), I64(x.shape[0]), I64(x.shape[1]), int(direction), int(group), ptr(out)), "turbo_wht")
        return out

    def flash_attn(dev, tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv, scale, rotate_q, inverse_out, group, prec_f32):
        ik, iv = type_id(tk), type_id(tv)
        q = np.ascontiguousarray(q, np.float32)
        n_head, n_q = q.shape[0], q.shape[1]
        kraw = np.ascontiguousarray(kraw, np.uint8)
        vraw = np.ascontiguousarray(vraw, np.uint8)
        out = np.zeros(n_q * n_head * Dv, np.float32)
        check(lib.tp_flash_attn(on_device(dev), ik, ptr(kraw), iv, ptr(vraw), ptr(q), I64(D), I64(Dv), I64(n_q), I64(n_kv),
                                I64(n_head), I64(n_head_kv), F(scale), int(rotate_q), int(inverse_out), int(group),
                                int(prec_f32), ptr(out)), "flash_attn")
        return out.reshape(n_q, n_head, Dv)

    def wht_args():
        return lib.tp_wht_nargs()

    handlers = {f.__name__: f for f in (devices, type_info, set_rows, quantize_chunk, to_float, decode,
                                        turbo_wht, flash_attn, wht_args, rpc_status, alloc_size, row_bytes)}
    while True:
        hdr = proto_in.read(8)
        if len(hdr) < 8:
            return
        (n,) = struct.unpack("<Q", hdr)
        method, args = pickle.loads(proto_in.read(n))
        try:
            res = ("ok", handlers[method](*args))
        except Unsupported as e:
            res = ("unsupported", str(e))
        except Exception as e:  # reported to the caller, which re-raises as HarnessError
            res = ("error", f"{type(e).__name__}: {e}")
        data = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
        proto_out.write(struct.pack("<Q", len(data)) + data)
        proto_out.flush()


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
        worker: the command that starts a worker (default ``python -m harness.fork.probe lib_path``);
            tests pass a fake that speaks the same protocol.
    """

    def __init__(self, lib_path: Path, timeout_s: float = 600.0, env: dict | None = None,
                 worker: list[str] | None = None):
        self.lib_path = str(lib_path)
        self.timeout_s = timeout_s
        self.env = env
        self.worker = list(worker) if worker else [sys.executable, "-m", "harness.fork.probe", self.lib_path]
        self.proc: subprocess.Popen | None = None
        self.errlog = tempfile.NamedTemporaryFile(prefix="turbo-probe-", suffix=".log", delete=False)
        self.crashes: list[str] = []
        self._call_start = 0  # errlog offset where the call in flight began

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


if __name__ == "__main__":  # pragma: no cover
    _serve(sys.argv[1])
