"""Probe crashes: each crash is reported with what that call printed (never an earlier crash's assert),
the next call gets a fresh worker, and a crash on an op the backend accepted is the fork's FAIL."""
import sys
import textwrap

import numpy as np
import pytest

from harness.checks import pq6_attention
from harness.errors import HarnessError, ProbeCrash
from harness.fork.probe import Probe
from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget

# A fake worker speaking the probe protocol. Method 'crashy' takes (action, text): 'abort' prints the text
# to stderr and dies of SIGABRT, 'segv' prints it and dies of SIGSEGV, anything else answers ('ok', text).
FAKE_WORKER = textwrap.dedent('''
    import os, pickle, signal, struct, sys
    out = sys.stdout.buffer
    while True:
        hdr = sys.stdin.buffer.read(8)
        if len(hdr) < 8:
            break
        method, args = pickle.loads(sys.stdin.buffer.read(struct.unpack("<Q", hdr)[0]))
        action, text = args
        if action in ("abort", "segv"):
            sys.stderr.write(text + "\\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGABRT if action == "abort" else signal.SIGSEGV)
        data = pickle.dumps(("ok", text))
        out.write(struct.pack("<Q", len(data)) + data)
        out.flush()
''')


def fake_probe(tmp_path) -> Probe:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return Probe("unused.so", timeout_s=60, worker=[sys.executable, str(script)])


def crash_message(probe, action, text) -> str:
    try:
        probe.call("crashy", action, text)
    except ProbeCrash as e:
        return str(e)
    raise AssertionError("no crash")


def test_each_crash_quotes_its_own_call(tmp_path):
    p = fake_probe(tmp_path)
    try:
        first = crash_message(p, "abort", "ggml.c:1234: GGML_ASSERT(a->ne[0] % 128 == 0) failed")
        assert "GGML_ASSERT(a->ne[0] % 128 == 0)" in first and "signal 6 (SIGABRT)" in first
        # a segfault that prints no assert must not be reported with the first crash's assert
        second = crash_message(p, "segv", "launching kernel for head 3")
        assert "signal 11 (SIGSEGV)" in second and "GGML_ASSERT" not in second and "launching kernel" in second
        third = crash_message(p, "abort", "ggml-cpu.c:99: GGML_ASSERT(ne11 == 64) failed")
        assert "GGML_ASSERT(ne11 == 64)" in third and "% 128" not in third
        assert p.call("crashy", "ok", "fresh worker answers") == "fresh worker answers"  # restarted clean
        assert p.crashes == [first, second, third]
    finally:
        p.close()


def test_worker_that_cannot_start_is_a_harness_error_not_a_fork_crash(tmp_path):
    # a worker exiting with a status (e.g. the library failed to load) is the harness failing to measure
    script = tmp_path / "broken_worker.py"
    script.write_text("import sys\nsys.stderr.write('OSError: libturbo_probe.so: cannot open shared object file\\n')\nsys.exit(1)\n")
    p = Probe("unused.so", timeout_s=60, worker=[sys.executable, str(script)])
    try:
        with pytest.raises(HarnessError, match="exit code 1.*cannot open shared object") as e:
            p.call("devices")
        assert not isinstance(e.value, ProbeCrash) and not p.crashes
    finally:
        p.close()


class ProbeBackedTarget(NumpyTarget):
    """The NumPy emulation whose flash attention first asks a (fake) native worker, as the fork target does:
    the worker crashes on 256-wide heads, with a different message for one and for many query rows."""

    def __init__(self, probe):
        super().__init__()
        self.probe = probe

    def flash_attn(self, backend, tk, kraw, tv, vraw, q, D, *a, **k):
        nq = np.asarray(q).shape[1]
        if D == 256:
            action = "abort" if nq == 1 else "segv"
            text = f"fattn.c:42: GGML_ASSERT(D=256 nq=1 {tk}/{tv}) failed" if nq == 1 else f"decode kernel {tk}/{tv} nq={nq}"
            self.probe.call("crashy", action, text)
        return super().flash_attn(backend, tk, kraw, tv, vraw, q, D, *a, **k)


def test_pq6_cells_each_get_their_own_crash_and_fail(tmp_path, make_ctx):
    p = fake_probe(tmp_path)
    try:
        ctx = make_ctx(ProbeBackedTarget(p), types=("turbo3",))
        cells = pq6_attention.run(ctx)
    finally:
        p.close()
    crashed = [c for c in cells if "D=256" in c.path]
    assert len(crashed) == 2
    one, many = sorted(crashed, key=lambda c: c.path)  # 'nq=1' sorts before 'nq=8'
    assert "nq=1" in one.path and "GGML_ASSERT(D=256 nq=1 turbo3/turbo3)" in one.caveat and "SIGABRT" in one.caveat
    assert "nq=8" in many.path and "SIGSEGV" in many.caveat and "decode kernel turbo3/turbo3 nq=8" in many.caveat
    assert "GGML_ASSERT" not in many.caveat  # not the earlier crash's assert
    # the backend accepted the op and the fork crashed: the fork's fault (spec "Who is at fault")
    assert all(c.verdict == Verdict.FAIL for c in crashed)
    assert not any(c.verdict == Verdict.ERROR for c in cells)
    assert any(c.verdict == Verdict.PASS for c in cells)  # the other shapes were measured after the crashes


def test_compile_c_stops_a_hanging_compiler_and_reports_an_unstartable_one(tmp_path, monkeypatch):
    """compile_c (the native probe and turbo-decode) ran the compiler without a time limit: a compiler that hangs
    hung the sweep. It is stopped after COMPILE_TIMEOUT_S with one line, its children included (a shell wrapper's
    child holds the output pipe); a compiler that cannot be started is one line too, not a traceback."""
    import time

    from harness.errors import HarnessError
    from harness.fork import probe as P
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\nsleep 60\necho done\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(P, "COMPILE_TIMEOUT_S", 1.0)
    t0 = time.time()
    with pytest.raises(HarnessError, match="took longer than 1 s"):
        P.compile_c("the test tool", tmp_path, tmp_path, tmp_path / "out" / "x", ["x.c"])
    assert time.time() - t0 < 20
    noexec = tmp_path / "cc2"
    noexec.write_text("not a program")
    monkeypatch.setenv("CC", str(noexec))
    with pytest.raises(HarnessError, match="could not run the C compiler"):
        P.compile_c("the test tool", tmp_path, tmp_path, tmp_path / "out" / "x", ["x.c"])
