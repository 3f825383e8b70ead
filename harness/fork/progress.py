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
                      every_s: float = EVERY_S) -> tuple[int, Progress, float]:
    """Run one build command, copying its output into ``logfile`` and calling ``log`` with a progress line every
    ``every_s`` seconds (none for a build that finishes sooner).

    Args:
        cmd: the ``cmake --build ... --target T`` command. target: named in the progress line.
        logfile: an open text file (the build log). log: callable taking one line (the console).
        env: the environment for the command.
    Returns:
        (exit code, :class:`Progress`, wall seconds).
    """
    t0 = time.monotonic()
    prog = Progress()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            errors="replace", bufsize=1)

    def pump():
        for line in proc.stdout:
            logfile.write(line)
            prog.feed(line)
        logfile.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    last = t0
    while True:
        try:
            proc.wait(timeout=max(0.5, every_s - (time.monotonic() - last)))
            break
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if now - last >= every_s:
                log(f"  ... {target}: {prog.describe()}, {now - t0:.0f} s")
                last = now
    reader.join()
    return proc.returncode, prog, time.monotonic() - t0
