"""Running ``cmake --build`` for one target with a progress line at least every 30 s (a first build on a loaded
2-core machine takes many minutes; silence looks like a hang).

The line names the target, the compile units done out of the total and the elapsed time, read from the build
tool's own output: Ninja prints ``[n/N] Building CXX object ...`` per step; CMake's Makefiles print
``[ p%] Building C object ...`` (the total is not printed there, so the line gives the count and the percentage).
Everything the build tool prints goes to the build log as before.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

# Ninja's default status '[n/N] ' (NINJA_STATUS); CMake's Makefile generator: '[ 45%] Building CXX object ...'
NINJA_RE = re.compile(r"^\[(\d+)/(\d+)\]")
MAKE_RE = re.compile(r"^\[\s*(\d+)%\]")
COMPILE_RE = re.compile(r"Building (?:C|CXX|CUDA|ASM|OBJC|OBJCXX) object")
EVERY_S = 30.0  # issue 23: "progress printed at least every 30 s during a build"


@dataclass
class Progress:
    """What the build tool has said so far: steps done and total (Ninja), percentage (Makefiles), compile units."""

    done: int = 0
    total: int | None = None
    percent: int | None = None
    compiled: int = 0
    lines: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        """Update from one line of ``cmake --build`` output."""
        m = NINJA_RE.match(line)
        if m:
            self.done, self.total = int(m.group(1)), int(m.group(2))
        m = MAKE_RE.match(line)
        if m:
            self.percent = int(m.group(1))
        if COMPILE_RE.search(line):
            self.compiled += 1

    def describe(self) -> str:
        """'112/240 build steps (98 compile units)' (Ninja) or '98 compile units, 41%' (Makefiles)."""
        if not (self.total or self.compiled or self.percent is not None):
            return "no step finished yet"
        if self.total:
            return f"{self.done}/{self.total} build steps ({self.compiled} compiled)"
        return f"{self.compiled} compile units" + (f", {self.percent}%" if self.percent is not None else "")


def run_with_progress(cmd: list[str], target: str, logfile, log, env: dict | None = None,
                      every_s: float = EVERY_S, stop: threading.Event | None = None) -> tuple[int, Progress, float]:
    """Run one build command, copying its output into ``logfile`` and calling ``log`` with a progress line every
    ``every_s`` seconds (none for a build that finishes sooner).

    Interrupted (SIGINT, SIGTERM, or any exception in the waiting thread, e.g. from ``log``), the command is stopped
    as Ctrl-C stops it (SIGINT, so that Ninja and Make remove their half-written outputs and the folder stays
    buildable; SIGTERM, then SIGKILL, for one that does not exit) and the thread copying its output has stopped
    writing to ``logfile`` before the exception is raised again: the caller may close the file at once.

    Args:
        cmd: the ``cmake --build ... --target T`` command. target: named in the progress line.
        logfile: an open text file (the build log). log: callable taking one line (the console).
        env: the environment for the command.
        stop: set by another thread to stop the command (a build run in a worker thread, which receives no
            signal); it is then stopped as above and its exit code returned.
    Returns:
        (exit code, :class:`Progress`, wall seconds).
    """
    t0 = time.monotonic()
    prog = Progress()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            errors="replace", bufsize=1)
    lock = threading.Lock()
    copying = {"on": True}  # False once the caller may close logfile: later lines are read and dropped

    def pump():
        for line in proc.stdout:
            with lock:
                if copying["on"]:
                    logfile.write(line)
            prog.feed(line)
        with lock:
            if copying["on"]:
                logfile.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    last = t0
    try:
        while True:
            if stop is not None and stop.is_set():
                _stop(proc)
                break
            wait = max(0.5, every_s - (time.monotonic() - last))
            try:
                proc.wait(timeout=min(wait, 0.5) if stop is not None else wait)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if now - last >= every_s:
                    log(f"  ... {target}: {prog.describe()}, {now - t0:.0f} s")
                    last = now
        reader.join()
    except BaseException:
        try:
            _stop(proc)
            reader.join(timeout=5)  # a grandchild holding the pipe open must not hold the caller
        finally:
            with lock:
                copying["on"] = False
        raise
    return proc.returncode, prog, time.monotonic() - t0


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a build command that still runs: SIGINT (what Ctrl-C sends: Ninja and Make then delete the outputs they
    had not finished), SIGTERM after ``grace_s``, SIGKILL 5 s later; returns once it has exited."""
    import signal
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
