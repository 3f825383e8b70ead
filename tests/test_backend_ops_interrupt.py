"""A signal that arrives while build_backend_ops waits for its test-backend-ops compile (after ``during`` returned:
the ggml build was quick, a ccache hit) stops the compile too. Review 28b: only an interruption inside ``during()``
set the stop event; one in the final ``worker.join()`` left the compile running in its (non-daemon) thread, so a
SIGTERM sent to the harness alone left the compiler running after the harness exited (minutes of CPU on 2 cores,
writing the object afterwards)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SLOW_CXX = """#!/usr/bin/env python3
import os, sys, time
open(os.environ["CXX_PID_FILE"], "w").write(str(os.getpid()))
time.sleep(60)
"""

DRIVER = """
import sys
from pathlib import Path
from harness.fork.standalone import build_backend_ops
from harness.interrupt import Interrupted, interruptible
fork, bdir, cxx = map(Path, sys.argv[1:4])
try:
    with interruptible():
        build_backend_ops(fork, bdir, lambda s: print(s, flush=True), cxx=str(cxx), during=lambda: None)
except Interrupted as e:
    print("interrupted", e.name, flush=True)
    sys.exit(e.exit_code)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


def test_sigterm_while_waiting_for_the_compile_stops_it(tmp_path):
    fork = tmp_path / "fork"
    (fork / "tests").mkdir(parents=True)
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "tests" / "test-backend-ops.cpp").write_text('#include "ggml.h"\nint main() { return 0; }\n')
    (fork / "ggml" / "include" / "ggml.h").write_text("\n")
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True)
    cxx = tmp_path / "slow-c++"
    cxx.write_text(SLOW_CXX)
    cxx.chmod(0o755)
    pid_file = tmp_path / "cxx.pid"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TURBO_CCACHE="0", CXX_PID_FILE=str(pid_file), PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(fork), str(bdir), str(cxx)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.time() < deadline and p.poll() is None, p.stdout.read() if p.poll() is not None else "no compile"
            time.sleep(0.05)
        time.sleep(0.3)  # the main thread waits in worker.join()
        p.send_signal(signal.SIGTERM)  # the harness alone, as `kill PID` sends it (the compiler gets nothing)
        out, _ = p.communicate(timeout=25)
        assert p.returncode == 143 and "interrupted SIGTERM" in out, (p.returncode, out)
        cpid = int(pid_file.read_text())
        deadline = time.time() + 15  # stopped (SIGINT, then SIGTERM after its grace), never left running on its own
        while time.time() < deadline and _alive(cpid):
            time.sleep(0.1)
        assert not _alive(cpid), "the test-backend-ops compile was left running after the harness exited"
    finally:
        if p.poll() is None:
            p.kill()
        if pid_file.is_file() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
