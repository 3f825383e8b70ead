"""Remote devices through ggml RPC (issue 14).

Without the fork: endpoint parsing and the security warning, the build option, naming of remote devices and
the default target, the server runner (a stand-in rpc-server), how a failed remote call is explained, and the
type handshake on the NumPy emulation (same-type kernel faults pass it, another type's bytes do not).

With the fork built with RPC (`make build RPC=1`; skip with the reason otherwise, fail under
TURBO_REQUIRE_FORK=1): the fork's rpc-server on 127.0.0.1 joins COMPAT and PQ6 as rpc0 with the local CPU's
results; a server killed mid-run gives a clear cell and a finished report; a stand-in server that renumbers
the turbo types stops the run with one line; a remote op that aborts the server is explained and the
harness-started server is restarted.
"""
from __future__ import annotations

import json
import os

import subprocess
import sys
import textwrap

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fork_build_or_skip, skip_or_fail

from harness.errors import HarnessError, ProbeCrash, RemoteLost, Unsupported
from harness.fork import build as fb
from harness.fork import rpc as R
from harness.runners.rpc_server import RpcServer, free_port, reachable
from harness.targets.numpy_target import NumpyTarget

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- no fork needed

def test_endpoints_are_parsed_and_bad_ones_refused_in_one_line():
    assert R.parse_endpoints("127.0.0.1:50052, gpu-box:1,127.0.0.1:50052") == ["127.0.0.1:50052", "gpu-box:1"]
    for bad in ("127.0.0.1", "host:0", "host:70000", "a b:1", ","):
        with pytest.raises(HarnessError) as e:
            R.parse_endpoints(bad)
        assert "\n" not in str(e.value) and "--rpc" in str(e.value)


def test_non_loopback_server_gets_the_unauthenticated_warning(tmp_path):
    assert R.is_loopback("127.0.0.1:1") and R.is_loopback("localhost:1") and R.is_loopback("[::1]:1")
    assert not R.is_loopback("10.0.0.7:50052") and not R.is_loopback("mac.local:50052")
    assert R.security_warning(["127.0.0.1:50052"]) is None
    w = R.security_warning(["127.0.0.1:50052", "10.0.0.7:50052"])
    assert "10.0.0.7:50052" in w and "unauthenticated" in w and "ssh -N -L" in w and "127.0.0.1:50052," not in w
    # the CLI prints it before it tries to connect (here the fork is absent or the server unreachable: exit 2)
    r = _cli(["check", "COMPAT", "--rpc", "10.255.255.1:50052", "--out", str(tmp_path / "r"), "--rpc-timeout", "5"],
             env={"FORK_DIR": str(tmp_path / "nofork")})
    assert r.returncode == 2
    assert "warning:" in r.stderr and "unauthenticated" in r.stderr


def test_rpc_options_refuse_a_numpy_target_and_bad_timeouts(tmp_path):
    r = _cli(["check", "PQ1", "--numpy-target", "", "--rpc", "127.0.0.1:1", "--out", str(tmp_path / "r")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fork build" in r.stderr
    r = _cli(["check", "PQ1", "--rpc", "127.0.0.1:1", "--rpc-timeout", "0", "--out", str(tmp_path / "r")])
    assert r.returncode == 2 and "--rpc-timeout" in r.stderr


def test_remote_devices_are_backends_rpc0_rpc1_and_never_the_default_target():
    from harness.targets.fork import select_backends
    from harness.usage import backend_name
    from harness.verify import pick_target_backend
    devs = [{"name": "CPU", "description": "x", "reg": "CPU", "kind": "cpu"},
            {"name": "RPC0", "description": "127.0.0.1:5", "reg": "RPC", "kind": "gpu"},
            {"name": "RPC1", "description": "127.0.0.1:6", "reg": "RPC", "kind": "gpu"}]
    bs = select_backends(devs)
    assert [b.name for b in bs] == ["cpu", "rpc0", "rpc1"] and bs[2].description == "127.0.0.1:6"

    class T:
        def backends(self):
            return bs
    assert pick_target_backend(T(), None) == "cpu"  # ggml calls every RPC device a GPU: not a reason to target it
    assert pick_target_backend(T(), "rpc1") == "rpc1"
    assert backend_name("RPC0", "--target") == "rpc0"
    with pytest.raises(HarnessError):
        backend_name("rpcx", "--target")


def _fake_cmake(tmp_path: Path) -> Path:
    """A cmake on PATH that logs its arguments and writes a CMakeCache.txt saying whether GGML_RPC was asked."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "cmake").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, pathlib
        a = sys.argv[1:]
        open({str(tmp_path / 'cmake.log')!r}, 'a').write(' '.join(a) + '\\n')
        if '-B' in a:
            b = pathlib.Path(a[a.index('-B') + 1]); b.mkdir(parents=True, exist_ok=True)
            (b / 'CMakeCache.txt').write_text('GGML_RPC:BOOL=' + ('ON' if '-DGGML_RPC=ON' in a else 'OFF') + '\\n')
        """))
    (bindir / "cmake").chmod(0o755)
    return bindir


def test_build_option_adds_ggml_rpc_and_rpc_server_and_records_it(tmp_path, monkeypatch):
    fork = tmp_path / "fork"
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "ggml" / "include" / "ggml.h").write_text("GGML_TYPE_TURBO3_0 = 43,\n")
    monkeypatch.setenv("PATH", f"{_fake_cmake(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    res = fb.build("cpu", ["ggml"], fork=fork, bdir=tmp_path / "b", jobs=1, log=lambda s: None, rpc=True)
    log = (tmp_path / "cmake.log").read_text()
    assert "-DGGML_RPC=ON" in log and "--target rpc-server" in log
    assert res.meta["rpc"] is True and "-DGGML_RPC=ON" in res.meta["cmake_options"]
    assert fb.read_build_meta(tmp_path / "b")["rpc"] is True and fb.has_rpc(tmp_path / "b")
    res = fb.build("cpu", ["ggml"], fork=fork, bdir=tmp_path / "c", jobs=1, log=lambda s: None)
    assert res.meta["rpc"] is False and not fb.has_rpc(tmp_path / "c")


def _fake_server(tmp_path: Path) -> Path:
    """A stand-in rpc-server: records its arguments, prints the banner, serves TCP on -H/-p until killed."""
    p = tmp_path / "rpc-server"
    p.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import socket, sys, time
        a = sys.argv[1:]
        host, port = a[a.index('-H') + 1], int(a[a.index('-p') + 1])
        open({str(tmp_path / 'args')!r}, 'w').write(' '.join(a))
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(4)
        print('Starting RPC server v4.0.0'); print('Devices:'); print('  CPU: Fake CPU (100 MiB, 90 MiB free)')
        print('  transport      : TCP', flush=True)
        while True:
            c, _ = s.accept(); c.close()
        """))
    p.chmod(0o755)
    return p


def test_harness_started_server_binds_loopback_only_and_reports_its_death(tmp_path):
    srv = RpcServer(_fake_server(tmp_path), log_path=tmp_path / "srv.log", devices=["CPU"]).start()
    try:
        args = (tmp_path / "args").read_text().split()
        assert args[args.index("-H") + 1] == "127.0.0.1" and args[args.index("-d") + 1] == "CPU"
        assert srv.endpoint.startswith("127.0.0.1:") and reachable(srv.endpoint)
        assert srv.served_devices() == ["CPU: Fake CPU (100 MiB, 90 MiB free)"]
        srv.kill()
        assert not srv.alive() and srv.exit_text() == "killed by SIGKILL" and not reachable(srv.endpoint, 0.5)
    finally:
        srv.stop()
    import inspect
    assert "host" not in inspect.signature(RpcServer).parameters  # no way to serve another interface


class _Probe:
    """A probe whose calls raise what a dying remote makes the worker report."""

    def __init__(self, exc):
        self.exc, self.timeout_s = exc, 600.0

    def set_rows(self, *a):
        raise self.exc


class _Server:
    def __init__(self, line, alive=False):
        self.line, self._alive, self.starts, self.started = line, alive, 1, 0

    def settle(self, wait_s):
        return self._alive

    alive = lambda self: self._alive  # noqa: E731

    def last_line(self):
        return self.line

    def exit_text(self):
        return "killed by SIGABRT"

    def start(self):
        self.started += 1
        self.starts += 1
        return self

    def kill(self):
        self._alive = False


def _target_with(probe, servers=None, ep="127.0.0.1:9"):
    from harness.targets.base import Backend
    from harness.targets.fork import ForkTarget
    t = ForkTarget.__new__(ForkTarget)  # no fork build: only the remote-call plumbing is exercised
    t.probe, t.rpc, t.rpc_servers, t.rpc_timeout_s, t.rpc_restarts, t.rpc_events = probe, [ep], servers or {}, 30.0, 20, []
    t._devices, t._backends = [], [Backend("cpu", "CPU", "cpu"), Backend("rpc0", "RPC0", "gpu", ep)]
    t._rpc_devices = {"rpc0": ep}
    return t


def test_failed_remote_call_is_explained_never_a_fork_crash():
    crash = ProbeCrash("fork code crashed in probe call set_rows (signal 6 (SIGABRT)): Remote RPC server crashed")
    x = np.zeros((1, 128), np.float32)
    # a server of ours that said its backend cannot run the op: not covered, with its words; restarted
    srv = _Server("ggml_cuda_compute_forward: op not supported set_rows (SET_ROWS)")
    t = _target_with(_Probe(crash), {"127.0.0.1:9": srv})
    with pytest.raises(Unsupported, match="op not supported"):
        t.quantize("rpc0", "set_rows", "turbo3", x)
    assert srv.started == 1 and "restarted" in t.rpc_events[0]
    # a server of ours that aborted otherwise: ERROR (RemoteLost) quoting it
    t = _target_with(_Probe(crash), {"127.0.0.1:9": _Server("ops.cpp:4896: fatal error")})
    with pytest.raises(RemoteLost, match="died \\(killed by SIGABRT\\) during set_rows turbo3: ops.cpp:4896: fatal error"):
        t.quantize("rpc0", "set_rows", "turbo3", x)
    # someone else's server that is gone: lost connection, no hang
    t = _target_with(_Probe(crash), ep=f"127.0.0.1:{free_port()}")
    with pytest.raises(RemoteLost, match="lost the connection .* no longer reachable"):
        t.quantize("rpc0", "set_rows", "turbo3", x)
    # a call that ran past the time limit on a hung server of ours: the server is killed and restarted
    srv = _Server("", alive=True)
    t = _target_with(_Probe(ProbeCrash("probe call set_rows timed out after 30 s and was killed")), {"127.0.0.1:9": srv})
    with pytest.raises(RemoteLost, match="took longer than 30 s; the server was killed; restarted"):
        t.quantize("rpc0", "set_rows", "turbo3", x)
    # the same crash on a local device is still the fork's crash (FAIL), untouched
    t = _target_with(_Probe(crash))
    with pytest.raises(ProbeCrash):
        t.quantize("cpu", "set_rows", "turbo3", x)


def test_lost_remote_is_an_error_cell_not_a_skip(make_ctx):
    """A remote that is gone while a decode route is chosen is ERROR (nothing measured), not 'not supported'."""
    from harness.checks.common import guarded
    from harness.checks.observations import decode_route
    from harness.report.model import Verdict

    class Gone(NumpyTarget):
        def decode(self, backend, route, type_name, raw, nrows, ncols):
            if backend == "rpc0":
                raise RemoteLost("remote rpc0: lost the connection to the rpc-server at 127.0.0.1:9")
            return super().decode(backend, route, type_name, raw, nrows, ncols)
    ctx = make_ctx(Gone(backends=(("cpu", "cpu"), ("rpc0", "gpu"))))
    cells = guarded(ctx, "PQ2", "turbo3", "rpc0", "get_rows", lambda: [decode_route(ctx, "rpc0", "turbo3")])
    assert cells[0].verdict == Verdict.ERROR and "lost the connection" in cells[0].caveat


class _Remote(NumpyTarget):
    """The NumPy emulation with a 'remote' rpc0 whose writer may produce another type's bytes."""

    def __init__(self, faults=(), shift: dict | None = None):
        super().__init__(backends=(("cpu", "cpu"), ("rpc0", "gpu")), backend_faults={"rpc0": set(faults)})
        self.shift = shift or {}

    def rpc_endpoint(self, backend):
        return "127.0.0.1:50052" if backend == "rpc0" else None

    def row_bytes(self, backend, t, ncols=128):
        i = self.type_info(t)
        return ncols // i["block_size"] * i["type_size"], ncols // i["block_size"] * i["type_size"]

    def quantize(self, backend, route, t, x):
        raw = super().quantize(backend, route, t, x)
        if backend == "rpc0" and t in self.shift:  # the server encodes another type into this type's buffer
            other = super().quantize(backend, route, self.shift[t], x)
            raw = np.resize(other, raw.shape)
        return raw


@pytest.mark.parametrize("fault", ["quantizer_signs", "dense_rotation", "uncorrected_norm", "thresholds_off",
                                   "thresholds_shift_1e-6", "swapped_packing", "decode_unrotated", "perturbed_centroids"])
def test_handshake_passes_same_type_kernel_faults_so_the_checks_judge_them(fault):
    from harness.targets.rpc import handshake
    res = handshake(_Remote([fault]), ["turbo2", "turbo3", "turbo4"])
    assert set(res["rpc0"]) >= {"turbo2", "turbo3", "turbo4", "q8_0"}


@pytest.mark.parametrize("a,b", [("turbo2", "turbo4"), ("turbo3", "turbo4"), ("turbo4", "turbo3"), ("turbo3", "turbo2")])
def test_handshake_stops_on_another_types_bytes_with_one_line(a, b):
    from harness.targets.rpc import handshake
    with pytest.raises(HarnessError) as e:
        handshake(_Remote(shift={a: b}), ["turbo2", "turbo3", "turbo4"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("type mismatch with rpc0 (127.0.0.1:50052)") and a in msg
    assert "another fork commit" in msg


# ----------------------------------------------------------------------------- the fork's rpc-server

def _rpc_build():
    bdir, fork = fork_build_or_skip()
    if not fb.has_rpc(bdir) or not (bdir / "bin" / "rpc-server").is_file():
        skip_or_fail(f"the fork build in {bdir} has no RPC backend or rpc-server: build it with `make test-ready` (make test does)")
    return bdir, fork


@pytest.fixture
def rpc_server(tmp_path):
    bdir, _ = _rpc_build()
    srv = RpcServer(bdir / "bin" / "rpc-server", log_path=tmp_path / "rpc-server.log").start()
    yield srv
    srv.stop()


def _cells(run: dict) -> list[dict]:
    return [c for chk in run["checks"] for c in chk["cells"]]




@pytest.mark.fork
@pytest.mark.slow
def test_loopback_server_joins_compat_and_pq6_with_the_local_cpus_results(rpc_server, tmp_path):
    """Acceptance 1: rpc0 (the fork's rpc-server, CPU backend, 127.0.0.1) in the writer x reader matrix and PQ6,
    every rpc0 cell equal in value and verdict to the same cell on the local CPU."""
    bdir, _ = _rpc_build()
    out = tmp_path / "run"
    r = _cli(["verify", "--checks", "PQ6,COMPAT", "--type", "turbo3", "--rpc", rpc_server.endpoint,
              "--build", bdir.name, "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"rpc handshake: rpc0 ({rpc_server.endpoint}) agrees on f16, q8_0, turbo3" in r.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["meta"]["backends_run"] == ["cpu", "rpc0"]
    assert run["meta"]["target"]["rpc"]["devices"]["rpc0"]["endpoint"] == rpc_server.endpoint
    assert run["meta"]["rpc_handshake"]["rpc0"]["turbo3"]["index_tv_remote_write"] == 0.0
    cells = _cells(run)
    remote = [c for c in cells if "rpc0" in c["path"]]
    assert {c["check"] for c in remote} == {"PQ6", "COMPAT"}
    writers = {c["path"] for c in remote if c["metric"].startswith("writer_")}
    assert writers == {"rpc0:set_rows"}
    assert any(c["path"] == "rpc0:set_rows -> cpu:flash_attn" for c in remote)  # remote writer, local reader
    assert any(c["path"] == "cpu:set_rows -> rpc0:flash_attn" for c in remote)  # local writer, remote reader
    by_key = {}
    for c in cells:
        by_key.setdefault((c["check"], c["type"], c["path"], c["metric"]), []).append(c)
    compared = 0
    for c in remote:
        twin_path = c["path"].replace("rpc0", "cpu")
        twins = by_key.get((c["check"], c["type"], twin_path, c["metric"]))
        if not twins:  # e.g. 'cpu:set_rows x rpc0:set_rows' has no cpu x cpu twin: judged on its own
            assert c["verdict"] == "PASS" and c["value"] == 0.0, c
            continue
        assert c["verdict"] == twins[0]["verdict"] == "PASS", (c, twins[0])
        assert c["value"] == pytest.approx(twins[0]["value"], rel=1e-6, abs=1e-12), (c["path"], c["metric"])
        compared += 1
    assert compared >= 10
    summary = (out / "summary.md").read_text()
    assert f"**remote rpc0**: {rpc_server.endpoint}" in summary and "not visible over RPC" in summary
    assert "type handshake: agrees on f16, q8_0, turbo3" in summary
    compat = next(c for c in run["checks"] if c["id"] == "COMPAT")
    table = next(t for t in compat["tables"] if t["id"] == "coverage")
    cov = [dict(zip(table["columns"], r_)) for r_ in table["rows"]]
    assert [r_["status"] for r_ in cov if r_["backend"] == "rpc0"] == [r_["status"] for r_ in cov if r_["backend"] == "cpu"]


@pytest.mark.fork
@pytest.mark.slow
def test_server_killed_mid_run_gives_a_clear_cell_and_a_finished_report(rpc_server, tmp_path):
    """Acceptance 1b: the server dies after PQ6 was written, during COMPAT: COMPAT's rpc0 cells are ERROR saying
    the connection was lost, the cpu cells are still measured, the report is complete (not interrupted), exit 2."""
    bdir, _ = _rpc_build()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "verify", "--checks", "PQ6,COMPAT", "--type", "turbo3",
                             "--rpc", rpc_server.endpoint, "--build", bdir.name, "--out", str(out), "--rpc-timeout", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 600:  # until PQ6 is written (run.json exists from the start)
        try:
            if "PQ6" in [c["id"] for c in json.loads((out / "run.json").read_text())["checks"]]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    rpc_server.kill()
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, stdout
    run = json.loads((out / "run.json").read_text())
    assert not run.get("interrupted")
    compat = next(c for c in run["checks"] if c["id"] == "COMPAT")
    assert compat["verdict"] == "ERROR"
    lost = [c for c in compat["cells"] if "rpc0" in c["path"] and c["verdict"] == "ERROR"]
    assert lost and all("rpc-server at " + rpc_server.endpoint in c["caveat"] for c in lost)
    assert any("no longer reachable" in c["caveat"] for c in lost)
    local = [c for c in compat["cells"] if "rpc0" not in c["path"] and c["path"].startswith("cpu:set_rows")]
    assert local and all(c["verdict"] == "PASS" for c in local)
    assert next(c for c in run["checks"] if c["id"] == "PQ6")["verdict"] == "PASS"
    summary = (out / "summary.md").read_text()
    assert "no longer reachable" in summary and "**remote event**" in summary


@pytest.mark.fork
def test_server_with_shifted_types_stops_the_run_with_one_line(rpc_server, tmp_path):
    """Acceptance 3: a stand-in for a server of another fork commit (a proxy renumbering turbo3 <-> turbo4 in every
    request) fails the type handshake: exit 2, one line naming the device and the type, no report written."""
    from rpc_proxy import ShiftingProxy

    from harness.targets.fork import ForkTarget
    bdir, fork = _rpc_build()
    t = ForkTarget(bdir, fork)
    ids = {n: t.type_info(n)["id"] for n in ("turbo3", "turbo4")}
    t.close()
    proxy = ShiftingProxy(rpc_server.endpoint, {ids["turbo3"]: ids["turbo4"], ids["turbo4"]: ids["turbo3"]})
    try:
        out = tmp_path / "run"
        r = _cli(["check", "COMPAT", "--type", "turbo3,turbo4", "--rpc", proxy.endpoint, "--build", bdir.name,
                  "--out", str(out)])
    finally:
        proxy.close()
    assert r.returncode == 2, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: type mismatch with rpc0 ({proxy.endpoint})"), r.stderr
    assert "turbo3" in err[0] and "another fork commit" in err[0]
    assert proxy.rewritten > 0 and not (out / "run.json").exists()


@pytest.mark.fork
def test_remote_abort_is_explained_and_the_harness_started_server_restarted(tmp_path):
    """An op the remote CPU backend cannot run (get_rows of a turbo type: its switch has no case and aborts) kills
    the server; the harness quotes the server's own message, restarts it, and the next call works."""
    from harness.targets.fork import ForkTarget
    bdir, fork = _rpc_build()
    srv = RpcServer(bdir / "bin" / "rpc-server", log_path=tmp_path / "srv.log").start()
    t = ForkTarget(bdir, fork, rpc=[srv.endpoint], rpc_servers={srv.endpoint: srv}, rpc_timeout_s=60)
    try:
        raw = t.quantize("cpu", "set_rows", "turbo3", np.ones((2, 128), np.float32))
        with pytest.raises((RemoteLost, Unsupported)) as e:
            t.decode("rpc0", "get_rows", "turbo3", raw, 2, 128)
        assert "rpc-server" in str(e.value) and "died (killed by SIGABRT)" in str(e.value)
        assert "fatal error" in str(e.value) and "restarted it" in str(e.value)
        dec = t.decode("rpc0", "cpy", "turbo3", raw, 2, 128)  # the restarted server serves the next call
        assert np.array_equal(dec, t.decode("cpu", "to_float", "turbo3", raw, 2, 128))
        assert srv.starts == 2
    finally:
        t.close()
        srv.stop()


@pytest.mark.fork
def test_unreachable_server_is_one_line_exit_2(tmp_path):
    bdir, _ = _rpc_build()
    port = free_port()
    r = _cli(["check", "COMPAT", "--type", "turbo3", "--rpc", f"127.0.0.1:{port}", "--build", bdir.name,
              "--out", str(tmp_path / "r")])
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "rpc-server" in err[0], r.stderr


def test_sweep_passes_rpc_to_both_tools_and_keys_its_cache_apart(tmp_path):
    """`sweep --rpc`: llama-perplexity and llama-bench get the fork's own `--rpc HOST:PORT,...`, the report's settings
    name the servers, and a sweep without --rpc neither gets the option nor reuses the remote results."""
    from tests.test_sweep_runner import TRAITS, _write_tiny_gguf, fake_tools

    from harness.runners.sweep import SweepConfig, parse_pairs, run_sweep
    bdir, calls = fake_tools(tmp_path)
    model, corpus = tmp_path / "m.gguf", tmp_path / "c.txt"
    _write_tiny_gguf(model)
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)

    def cfg(**kw):
        return SweepConfig(model=model, corpus=corpus, pairs=parse_pairs("turbo3/turbo3"), bdir=bdir, ctx=256, chunks=3,
                           depths=(0,), reps=1, threads=2, timeout=20, cache_dir=tmp_path / "cache", ngl=99, **kw)
    eps = ["127.0.0.1:50052", "127.0.0.1:50053"]
    res = run_sweep(cfg(rpc=eps), progress=False, log=lambda s: None, traits=TRAITS)
    lines = [ln for ln in calls.read_text().splitlines() if ln.strip()]
    assert res.jobs_run == 3 and len(lines) == 3
    assert all("--rpc 127.0.0.1:50052,127.0.0.1:50053" in ln for ln in lines)
    assert any(ln.startswith("bench ") for ln in lines)
    assert cfg(rpc=eps).pinned()["rpc"] == eps and "rpc" not in cfg().pinned()
    res = run_sweep(cfg(), progress=False, log=lambda s: None, traits=TRAITS)
    new = [ln for ln in calls.read_text().splitlines() if ln.strip()][3:]
    assert res.jobs_cached == 0 and len(new) == 3 and not any("--rpc" in ln for ln in new)


def test_sweep_rpc_needs_a_build_with_rpc_one_line(tmp_path):
    (tmp_path / "b" / "bin").mkdir(parents=True)
    r = _cli(["sweep", "--rpc", "127.0.0.1:50052", "--build-dir", str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "RPC backend" in r.stderr and "RPC=1" in r.stderr
    r = _cli(["sweep", "--rpc", "nohostport", "--build-dir", str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "is not HOST:PORT" in r.stderr


def test_rpc_compare_matches_cells_across_the_two_runs(tmp_path):
    """scripts/rpc_compare.py (acceptance 2's comparison): rpc0 cells matched with the direct backend's, a differing
    verdict or a cell without a counterpart makes it exit 1."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import rpc_compare

    def run(d, cells):
        (tmp_path / d).mkdir()
        (tmp_path / d / "run.json").write_text(json.dumps({"checks": [{"cells": cells}]}))
        return tmp_path / d

    def cell(path, verdict, value=0.0, metric="m"):
        return {"check": "COMPAT", "type": "turbo4", "path": path, "metric": metric, "verdict": verdict, "value": value}
    direct = run("direct", [cell("cuda:set_rows", "PARTIAL", 7e-6), cell("cpu:set_rows -> cuda:flash_attn", "PASS")])
    same = run("same", [cell("rpc0:set_rows", "PARTIAL", 7e-6), cell("cpu:set_rows -> rpc0:flash_attn", "PASS"),
                        cell("cpu:set_rows", "PASS")])
    other = run("other", [cell("rpc0:set_rows", "PASS"), cell("cpu:set_rows -> rpc0:flash_attn", "PASS")])
    extra = run("extra", [cell("rpc0:set_rows", "PARTIAL", 7e-6), cell("rpc0:get_rows", "PASS")])
    assert rpc_compare.main([str(direct), str(same)]) == 0
    assert rpc_compare.main([str(direct), str(other)]) == 1
    assert rpc_compare.main([str(direct), str(extra)]) == 1
    rows, ok = rpc_compare.compare(rpc_compare.cells(direct), rpc_compare.cells(same))
    assert ok and [r[2] for r in rows] == ["cuda:set_rows", "cpu:set_rows -> cuda:flash_attn"]


@pytest.mark.fork
def test_target_rpc0_makes_the_remote_device_the_production_target(rpc_server, tmp_path):
    bdir, _ = _rpc_build()
    out = tmp_path / "run"
    r = _cli(["check", "PQ4", "--type", "turbo3", "--rpc", rpc_server.endpoint, "--target", "RPC0", "--build", bdir.name,
              "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["meta"]["target_backend"] == "rpc0"
    cells = _cells(run)
    assert any(c["path"].startswith("rpc0:") and c["target"] for c in cells)
    assert not any(c["path"].startswith("cpu:") and c["target"] for c in cells)


@pytest.mark.fork
def test_a_server_that_comes_back_is_used_again(rpc_server):
    """A user's server that died gives lost-connection errors (local calls go on); once it is back on its port,
    the next remote call reaches it again (the worker retries the endpoint instead of remembering it as down)."""
    from harness.targets.fork import ForkTarget
    bdir, fork = _rpc_build()
    t = ForkTarget(bdir, fork, rpc=[rpc_server.endpoint], rpc_timeout_s=60)
    x = np.random.default_rng(3).standard_normal((4, 128)).astype(np.float32)
    try:
        want = t.quantize("cpu", "set_rows", "turbo3", x)
        assert np.array_equal(t.quantize("rpc0", "set_rows", "turbo3", x), want)
        rpc_server.kill()
        for _ in range(2):  # the call that saw it die, then a fresh worker that cannot reach it
            with pytest.raises(RemoteLost, match="no longer reachable"):
                t.quantize("rpc0", "set_rows", "turbo3", x)
        assert np.array_equal(t.quantize("cpu", "set_rows", "turbo3", x), want)
        rpc_server.start()
        assert np.array_equal(t.quantize("rpc0", "set_rows", "turbo3", x), want)
    finally:
        t.close()


def test_a_route_that_kills_the_remote_server_does_not_hide_the_next_route(make_ctx):
    """Over RPC a route the remote backend lacks can abort the server with a message the harness does not read as
    'unsupported'; the harness-started server is back for the next route, which is then used."""
    from harness.checks.observations import decode_route

    class FirstRouteKills(NumpyTarget):
        def routes(self, backend):
            r = super().routes(backend)
            if backend == "rpc0":
                r.decode = ["cpy", "get_rows"]
            return r

        def decode(self, backend, route, type_name, raw, nrows, ncols):
            if backend == "rpc0" and route == "cpy":
                raise RemoteLost("remote rpc0: the rpc-server at 127.0.0.1:9 died (killed by SIGABRT) during cpy "
                                 "decode turbo3: ops.cpp:4896: fatal error; restarted it for the next cells")
            return super().decode(backend, route, type_name, raw, nrows, ncols)
    ctx = make_ctx(FirstRouteKills(backends=(("cpu", "cpu"), ("rpc0", "gpu"))))
    assert decode_route(ctx, "rpc0", "turbo3") == "get_rows"


# ----------------------------------------------------------------------------- found by trying it as a new user

def test_empty_or_non_finite_rpc_values_are_refused_not_ignored(tmp_path):
    """`--rpc ''` and `--rpc-local ''` were taken as 'no remote device' and the run went on locally (a report with
    no rpc0, exit 0); `--rpc-timeout nan` compared false with 0 and switched the time limit off."""
    from harness.cli_rpc import RpcOptions
    for raw, local, what in (("", None, "names no server"), (None, "", "names no device"), (" , ", None, "names no server")):
        opts = RpcOptions(raw, local)
        assert opts.active
        with pytest.raises(HarnessError, match=what):
            opts.validate()
    for t in ("nan", "inf", "-inf"):
        with pytest.raises(HarnessError, match="--rpc-timeout .*finite number of seconds"):
            RpcOptions("127.0.0.1:1", None, float(t)).validate()
    # the command line: one line, exit 2, before the fork is looked at (here there is none)
    for args in (["--rpc", ""], ["--rpc-local", ""], ["--rpc", "127.0.0.1:1", "--rpc-timeout", "nan"]):
        r = _cli(["check", "PQ4", *args, "--out", str(tmp_path / "r")], env={"FORK_DIR": str(tmp_path / "nofork")})
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--rpc" in r.stderr, (args, r.stderr)
        assert not (tmp_path / "r" / "run.json").exists()


def test_endpoint_messages_name_the_actual_problem():
    """A port out of range and an IPv6 address each get their own fix, not 'is not HOST:PORT'. An IPv6 address was
    accepted in brackets and then failed as 'could not connect ... start the rpc-server there': the fork's RPC code
    is IPv4-only (parse_endpoint splits at the first ':', sockets are AF_INET)."""
    for bad, said in (("127.0.0.1:0", "port 0 is out of range"), ("127.0.0.1:99999", "port 99999 is out of range"),
                      ("::1:50052", "IPv4 only"), ("fe80::1", "IPv4 only"), ("[::1]:50052", "IPv4 only")):
        with pytest.raises(HarnessError, match=said) as e:
            R.parse_endpoints(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(HarnessError, match="is not HOST:PORT"):
        R.parse_endpoints("127.0.0.1:")


def test_a_sub_second_rpc_timeout_is_printed_as_given():
    """--rpc-timeout 0.5 was reported as 'took longer than 0 s'."""
    t = _target_with(_Probe(ProbeCrash("probe call set_rows timed out after 0.5 s and was killed")),
                     {"127.0.0.1:9": _Server("", alive=True)})
    t.rpc_timeout_s = 0.5
    with pytest.raises(RemoteLost, match="took longer than 0.5 s"):
        t.quantize("rpc0", "set_rows", "turbo3", np.zeros((1, 128), np.float32))


def test_a_lost_server_is_one_event_not_one_per_remote_call():
    """A server killed mid-run made every later remote call add the same event: ~100 identical console lines and
    'remote event' rows in summary.md. Equal events (but for the call) collapse into the first plus a count."""
    lost = "remote rpc0: lost the connection to the rpc-server at 127.0.0.1:9 during {}: it is no longer reachable"
    died = "rpc0 (127.0.0.1:9): the rpc-server died (killed by SIGABRT) during set_rows turbo3: boom; restarted"
    events = [lost.format("set_rows q8_0"), died, *[lost.format(f"set_rows turbo{i % 3 + 2}") for i in range(60)]]
    out = R.collapse_events(events)
    assert out == [lost.format("set_rows q8_0") + " (and 60 more remote calls failed the same way)", died]
    assert R.collapse_events([died, died]) == [died + " (and 1 more remote call failed the same way)"]
    assert R.collapse_events([]) == []


def test_sweep_refuses_an_unreachable_rpc_server_before_it_runs(tmp_path):
    """The fork's tools print 'Failed to connect to HOST:PORT' and carry on locally (exit 0), so a sweep with a
    dead --rpc measured this machine and its report said 'backends run: cpu, rpc HOST:PORT'."""
    bdir = tmp_path / "b"
    (bdir / "bin").mkdir(parents=True)
    (bdir / "CMakeCache.txt").write_text("GGML_RPC:BOOL=ON\n")
    port = free_port()
    r = _cli(["sweep", "--rpc", f"127.0.0.1:{port}", "--build-dir", str(bdir), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "rpc-server" in r.stderr and not (tmp_path / "o" / "run.json").exists()


def test_sweep_job_whose_tool_did_not_reach_the_server_is_an_error_never_a_result(tmp_path):
    """A server lost during the sweep: the tool's 'Failed to connect to' line makes the job fail (ERROR, not
    cached), and a record an older harness cached from such a run is not reused."""
    from tests.test_sweep_runner import BENCH, FIX, PPL, TRAITS, _script, _write_tiny_gguf

    from harness.runners.sweep import SweepConfig, parse_pairs, run_sweep
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    unreached = 'echo "Failed to connect to 127.0.0.1:50052" >&2\n'

    def tools(fail: bool):
        for name, text in (("llama-perplexity", PPL), ("llama-bench", BENCH)):
            body = text.format(calls=calls, fix=FIX)
            if fail:
                first, rest = body.split("\n", 1)
                body = first + "\n" + unreached + rest
            _script(bdir / "bin" / name, body)
    model, corpus = tmp_path / "m.gguf", tmp_path / "c.txt"
    _write_tiny_gguf(model)
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    cfg = SweepConfig(model=model, corpus=corpus, pairs=parse_pairs("turbo3/turbo3"), bdir=bdir, ctx=256, chunks=3,
                      depths=(0,), reps=1, threads=2, timeout=20, cache_dir=tmp_path / "cache", ngl=99,
                      rpc=["127.0.0.1:50052"])
    tools(fail=True)
    res = run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    assert not res.base.ok and "could not reach the rpc-server at 127.0.0.1:50052" in res.base.error
    assert res.jobs_run == res.jobs_failed == 2  # the baseline and the bench ran and failed; ppl had no baseline
    bench = res.bench["turbo3/turbo3"]
    assert not bench.ok and "nothing was measured remotely" in bench.error
    assert not res.ppl["turbo3/turbo3"].ok
    # a run that reached the server is cached; the same record with the connect failure in its log is not reused
    tools(fail=False)
    res = run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    assert res.jobs_run == 3 and res.base.ok
    assert run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS).jobs_cached == 3
    stderr = Path(res.bench["turbo3/turbo3"].evidence["bench.stderr"])
    stderr.write_text("Failed to connect to 127.0.0.1:50052\n" + stderr.read_text())
    again = run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    assert again.jobs_cached == 2 and again.jobs_run == 1 and again.bench["turbo3/turbo3"].ok


def test_rpc_local_with_an_unknown_device_says_what_the_option_takes(tmp_path):
    """`--rpc-local NOPE` quoted the server's 'error: unknown device: NOPE' and stopped there: no fix."""
    fake = tmp_path / "rpc-server"
    fake.write_text("#!/bin/sh\necho 'error: unknown device: NOPE' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(HarnessError) as e:
        RpcServer(fake, devices=["NOPE"], log_path=tmp_path / "srv.log").start()
    msg = str(e.value)
    assert "\n" not in msg and "unknown device: NOPE" in msg and "--rpc-local CPU" in msg


def test_bench_rpc_bad_arguments_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """`make bench-rpc ARGS=...` (scripts/bench_rpc.py): bad row counts, zero repetitions and a missing build were
    Python tracebacks (ValueError, or a HarnessError from the first probe call)."""
    script = ROOT / "scripts" / "bench_rpc.py"
    cases = ((["--rows", "abc"], "--rows"), (["--rows", ""], "--rows"), (["--rows", "0"], "--rows"),
             (["--compat-rows", "8,-1"], "--compat-rows"), (["--reps", "0"], "--reps"), (["--build", "nope"], "not built"))
    # the script as make runs it, once; the other cases through its main() in this process (the same code after
    # start-up, without five more interpreter starts): an exception would propagate here and fail the test
    r = subprocess.run([sys.executable, str(script), *cases[0][0]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TURBO_BUILD_ROOT": str(tmp_path / "builds")})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert cases[0][1] in r.stderr and "Traceback" not in r.stderr
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_rpc_script", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("TURBO_BUILD_ROOT", str(tmp_path / "builds"))
    for args, said in cases[1:]:
        capsys.readouterr()
        code = bench.main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert said in err


def test_handshake_stopped_by_the_time_limit_names_the_time_limit_not_another_commit():
    """`--rpc-timeout 1e-9` (or a slow tunnel) stopped the handshake with 'the server is probably a build of another
    fork commit': the wrong fix. A call that ran past the limit now names --rpc-timeout."""
    from harness.targets.rpc import handshake

    class Slow(_Remote):
        def quantize(self, backend, route, t, x):
            if backend == "rpc0":
                raise RemoteLost("remote rpc0: set_rows f16 on the rpc-server at 127.0.0.1:50052 took longer than "
                                 "0.5 s and was stopped")
            return super().quantize(backend, route, t, x)
    with pytest.raises(HarnessError) as e:
        handshake(Slow(), ["turbo3"])
    msg = str(e.value)
    assert "\n" not in msg and "--rpc-timeout" in msg and "another fork commit" not in msg
    # a lost connection during the handshake keeps the other-commit advice (such a server aborts on unknown ops)
    class Lost(_Remote):
        def quantize(self, backend, route, t, x):
            if backend == "rpc0":
                raise RemoteLost("remote rpc0: lost the connection to the rpc-server at 127.0.0.1:50052")
            return super().quantize(backend, route, t, x)
    with pytest.raises(HarnessError, match="another fork commit"):
        handshake(Lost(), ["turbo3"])


def test_a_stored_report_with_repeated_remote_events_renders_each_kind_once():
    """`turbo-harness report` on a run written before events were collapsed listed the same lost connection once
    per remote call (97 'remote event' rows in one real run)."""
    from harness.report.remote import remote_facts
    lost = "remote rpc0: lost the connection to the rpc-server at 127.0.0.1:9 during set_rows {}: no longer reachable"
    meta = {"target": {"rpc": {"devices": {"rpc0": {"endpoint": "127.0.0.1:9", "memory_total_mib": 1}},
                               "events": [lost.format(t) for t in ("q8_0", "turbo2", "turbo3", "turbo4")]}}}
    events = [text for label, text in remote_facts(meta) if label == "remote event"]
    assert events == [lost.format("q8_0") + " (and 3 more remote calls failed the same way)"]


def test_doctor_says_whether_each_build_can_use_remote_devices(tmp_path):
    """`doctor` never said whether a build has ggml RPC, so a new user learnt it only from `--rpc` failing."""
    from click.testing import CliRunner

    from harness.cli import cli
    root = tmp_path / "builds"
    for name, rpc, server in (("cpu", "ON", True), ("cuda", "OFF", False), ("vulkan", "ON", False)):
        (root / name / "bin").mkdir(parents=True)
        (root / name / "bin" / "libggml-base.so").write_text("")
        (root / name / "CMakeCache.txt").write_text(f"GGML_RPC:BOOL={rpc}\n")
        if server:
            (root / name / "bin" / "rpc-server").write_text("")
    out = CliRunner().invoke(cli, ["doctor"], env={"TURBO_BUILD_ROOT": str(root),
                                                  "FORK_DIR": str(tmp_path / "nofork")}).output
    remote = [ln for ln in out.splitlines() if "remote (RPC)" in ln]
    assert len(remote) == 3, out
    cpu, cuda, vulkan = remote  # builds in name order
    assert "yes" in cpu and "rpc-server" not in cpu
    assert "no:" in cuda and "build --rpc" in cuda
    assert "yes" in vulkan and "no rpc-server binary" in vulkan


@pytest.mark.fork
def test_a_port_that_accepts_but_never_answers_is_one_line_within_the_rpc_timeout(tmp_path):
    """A port that accepts connections but never answers RPC's hello (an rpc-server busy with another client: it
    serves one at a time; a stuck server; another service) held `check --rpc` for the probe's 600 s limit, ignoring
    --rpc-timeout, because the probe's first call (the type listing) connects to the servers."""
    import socket
    import threading
    bdir, _ = _rpc_build()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # accepted, never answered
            except OSError:
                pass
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.time()
        r = _cli(["check", "PQ4", "--type", "turbo3", "--rpc", f"127.0.0.1:{port}", "--rpc-timeout", "3",
                  "--build", bdir.name, "--out", str(tmp_path / "r")], timeout=120)
        assert time.time() - t0 < 60
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"127.0.0.1:{port}" in r.stderr and "no answer within 3 s" in r.stderr and "--rpc-timeout" in r.stderr
    finally:
        stop.set()
        th.join()
        for c in held:
            c.close()
        srv.close()


def test_remote_devices_join_in_endpoint_order_even_when_one_was_down():
    """ggml names a remote device from a process-wide counter when its server is added. A fresh probe worker that
    found the first server down added the second, whose device became 'RPC0'; once the first server was back it
    became 'RPC1', so every 'rpc0' cell was measured on the other server's device. Servers now join strictly in
    endpoint order: a down server holds back the ones after it."""
    from harness.fork.rpc import RegistryJoin
    names: dict[str, str] = {}
    up = {"10.0.0.1:1": False, "10.0.0.2:2": True}

    def add(ep):  # ggml_backend_rpc_add_server: one device per server, named from the counter at the time
        if not up[ep]:
            return f"could not connect to the rpc-server at {ep}"
        if ep not in names.values():
            names[f"RPC{len(names)}"] = ep
        return None
    j = RegistryJoin(["10.0.0.1:1", "10.0.0.2:2"], add)
    assert names == {} and not j.join()
    assert set(j.status()) == {"10.0.0.1:1", "10.0.0.2:2"} and "could not connect" in j.status()["10.0.0.1:1"]
    assert "waits for 10.0.0.1:1" in j.status()["10.0.0.2:2"]
    up["10.0.0.1:1"] = True  # the harness restarted it
    assert j.join() and j.status() == {}
    assert names == {"RPC0": "10.0.0.1:1", "RPC1": "10.0.0.2:2"}


def test_rpc_server_that_cannot_be_executed_is_one_line(tmp_path, monkeypatch):
    """An rpc-server file that is not executable (no stdbuf wrapper in between) escaped as a PermissionError
    traceback from subprocess.Popen."""
    from harness.errors import HarnessError
    from harness.runners import rpc_server as S
    b = tmp_path / "rpc-server"
    b.write_text("not a program")
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(HarnessError, match="could not start .*rpc-server"):
        S.RpcServer(b, log_path=tmp_path / "log").start(wait_s=2)
