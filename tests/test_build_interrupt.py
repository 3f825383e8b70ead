"""Ctrl-C during a build (tryout 28, item 1): `turbo-harness build` interrupted while the build tool runs prints one
line and exits 130 (143 for SIGTERM), never a traceback from the thread that copies the tool's output into the build
log, and never 1 (README: 1 means the fork failed). The build tool is a fake `cmake` that prints a line every 0.1 s;
the fork is a folder with a ggml.h that names the turbo types."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_CMAKE = r"""#!/usr/bin/env python3
import os, sys, time
args = sys.argv[1:]
if "--version" in args:
    print("cmake version 3.99.0"); sys.exit(0)
if "--build" in args:
    bdir = args[args.index("--build") + 1]
    with open(os.path.join(bdir, "fake-cmake.pid"), "w") as f:
        f.write(str(os.getpid()))
    n = int(os.environ.get("FAKE_STEPS", "600"))
    for i in range(n):
        print(f"[{i + 1}/{n}] Building C object ggml/src/step{i}.c.o", flush=True)
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.1")))
    sys.exit(0)
bdir = args[args.index("-B") + 1]  # configure: a CMakeCache.txt as CMake writes it
os.makedirs(bdir, exist_ok=True)
with open(os.path.join(bdir, "CMakeCache.txt"), "w") as f:
    f.write("CMAKE_C_COMPILER:FILEPATH=/usr/bin/cc\nCMAKE_CXX_COMPILER:FILEPATH=/usr/bin/c++\n")
"""


@pytest.fixture
def fake(tmp_path):
    """(environment, fork folder, build root): a fake cmake first on PATH, a fork with the turbo types, no ccache."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cmake").write_text(FAKE_CMAKE)
    (bindir / "cmake").chmod(0o755)
    fork = tmp_path / "fork"
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "ggml" / "include" / "ggml.h").write_text("enum ggml_type { GGML_TYPE_TURBO3_0 = 41 };\n")
    root = tmp_path / "root"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", TURBO_BUILD_ROOT=str(root),
               TURBO_CCACHE="0", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.pop("FORK_DIR", None)
    return env, fork, root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_build(env: dict, fork: Path, root: Path):
    """`turbo-harness build` of the fake fork in its own session (so that a test can signal its whole group), once the
    fake cmake has started (its pid file written, or 60 s): (process, pid file)."""
    p = subprocess.Popen([sys.executable, "-c", "from harness.cli import main; main()", "build", "--fork-dir", str(fork),
                          "--backend", "cpu", "--targets", "ggml"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    pidfile = root / "cpu" / "fake-cmake.pid"
    deadline = time.time() + 60
    while not pidfile.is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    return p, pidfile


@pytest.mark.parametrize("sig,code,whom", [(signal.SIGINT, 130, "group"), (signal.SIGINT, 130, "harness"),
                                           (signal.SIGTERM, 143, "harness")])
def test_signal_during_a_build_is_one_line_and_its_exit_code(fake, sig, code, whom):
    """'group' is Ctrl-C in a terminal (or `timeout -s INT`): the harness and the build tool get the signal;
    'harness' signals the harness alone, which must then stop the build tool itself."""
    env, fork, root = fake
    p, pidfile = _start_build(env, fork, root)
    try:
        assert pidfile.is_file(), p.communicate(timeout=30)
        time.sleep(0.6)  # the tool has printed a few lines, the copying thread is writing the log
        os.killpg(p.pid, sig) if whom == "group" else p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, out + err
    assert "Traceback" not in err and "Error" not in err and "Aborted" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"interrupted by {signal.Signals(sig).name}" in lines[0], err
    assert str(root / "cpu") in lines[0]  # where the build stopped, kept for the next build
    tool = int(pidfile.read_text())
    deadline = time.time() + 10
    while _alive(tool) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(tool), "the build tool was left running"
    log = (root / "cpu" / "turbo-harness-build.log").read_text()
    assert "Building C object" in log  # the output was copied until the stop
    assert not (root / "cpu" / "turbo-harness-build.json").exists()  # no record of a build that did not finish


def test_the_folder_of_an_interrupted_build_is_built_again(fake, monkeypatch):
    """The interrupted folder is reused: the next build configures nothing again and finishes."""
    from harness.fork import build as fb
    env, fork, root = fake
    p, pidfile = _start_build(env, fork, root)
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130
    for k in ("PATH", "TURBO_BUILD_ROOT", "TURBO_CCACHE"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("FAKE_STEPS", "3")
    monkeypatch.setenv("FAKE_STEP_S", "0")
    lines = []
    res = fb.build("cpu", ["ggml"], fork=fork, log=lines.append)
    assert res.dir == root / "cpu" and (res.dir / "turbo-harness-build.json").is_file()
    assert res.meta["targets"] == ["ggml"]


def test_the_copying_thread_stops_before_the_log_is_closed(tmp_path, monkeypatch):
    """The reported traceback ('ValueError: I/O operation on closed file' from the copying thread): the caller's
    `with open(log)` closes the file as the interruption leaves it; the build tool is stopped before that and no line
    is written to the closed file (here the interruption comes from the progress callback, in the waiting thread)."""
    import threading
    from harness.fork.progress import run_with_progress
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda a: thread_errors.append(a.exc_value))
    pidfile = tmp_path / "tool.pid"
    script = (f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
              "for i in range(400):\n    print(f'[{i + 1}/400] Building C object x{i}.c.o', flush=True)\n"
              "    time.sleep(0.02)\n")

    def log(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with open(tmp_path / "build.log", "a") as lf:
            run_with_progress([sys.executable, "-c", script], "ggml", lf, log, every_s=0.3)
    time.sleep(0.5)  # the tool would have printed about 25 more lines by now
    assert thread_errors == []
    assert not _alive(int(pidfile.read_text()))


def test_a_stop_event_stops_a_build_run_in_a_worker_thread(tmp_path):
    """A compile run in a worker thread (test-backend-ops beside ggml) gets no signal: its stop event ends it."""
    import threading
    from harness.fork.progress import run_with_progress
    stop = threading.Event()
    got = {}
    with open(tmp_path / "build.log", "a") as lf:
        t = threading.Thread(target=lambda: got.update(r=run_with_progress(
            [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
                                  "print('start', flush=True); time.sleep(60)"], "t", lf, print,
            stop=stop)))
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        stop.set()
        t.join(timeout=20)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert got["r"][0] != 0  # stopped, not finished
