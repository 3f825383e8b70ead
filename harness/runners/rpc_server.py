"""The fork's own ``rpc-server`` (tools/rpc), started by the harness on the loopback interface only.

ggml's RPC protocol has no authentication (the fork's tools/rpc/README: "never run the RPC server on an
open network"), so a server the harness starts binds 127.0.0.1, always; a remote machine is reached by
starting rpc-server there by hand and forwarding its port over SSH (README "Remote devices").

The server's stdout and stderr go to a log file: its banner names the devices it serves ("Devices:" then
one "  NAME: description (N MiB, M MiB free)" line each) and, when it dies, its last lines say why.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.errors import HarnessError

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def reachable(endpoint: str, timeout_s: float = 2.0) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout_s`` seconds (closed again at once)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class RpcServer:
    """One ``rpc-server`` process on 127.0.0.1.

    Args:
        binary: the fork's ``bin/rpc-server`` (:func:`harness.fork.build.binary`).
        port: TCP port (default: a free one).
        devices: ggml device names to serve (``-d``, e.g. ['CUDA0']); default the server's choice (all
            accelerators, else the CPU).
        threads: CPU threads of the server's CPU device (``-t``).
        log_path: file for its output (default a file beside nothing: ``/tmp/turbo-rpc-<port>.log``).
        env: its environment (default the harness's).

    There is no host argument on purpose: the harness never serves ggml RPC on another interface.
    """

    def __init__(self, binary: Path, port: int | None = None, devices: list[str] | None = None, threads: int = 2,
                 log_path: Path | None = None, env: dict | None = None):
        self.binary = Path(binary)
        self.port = int(port or free_port())
        self.devices = list(devices or [])
        self.threads = int(threads)
        self.log_path = Path(log_path or f"/tmp/turbo-rpc-{self.port}.log")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        """'127.0.0.1:PORT', what ``--rpc`` takes."""
        return f"{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        """The command line (binds 127.0.0.1; line-buffered output where coreutils' stdbuf exists)."""
        cmd = [str(self.binary), "-H", LOOPBACK, "-p", str(self.port), "-t", str(self.threads)]
        if self.devices:
            cmd += ["-d", ",".join(self.devices)]
        stdbuf = shutil.which("stdbuf")
        return ([stdbuf, "-oL", "-eL"] if stdbuf else []) + cmd

    def start(self, wait_s: float = 30.0) -> "RpcServer":
        """Start the server and wait until its port accepts connections.

        Raises:
            HarnessError: the binary is missing or cannot be run, the server exited at start (its last line
                quoted), or the port did not open within ``wait_s`` seconds (the server is stopped again).
        """
        if not self.binary.is_file():
            raise HarnessError(f"{self.binary} not found: build the fork with RPC (`turbo-harness build --rpc`, "
                               f"or `make build RPC=1`)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.ctime()} {' '.join(self.command())}\n".encode())
            log.flush()
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("GGML_NO_BACKTRACE", "1")  # no gdb backtrace on an abort: slow, and it buries the message
            try:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            except OSError as e:  # not executable, wrong architecture: one line, not a traceback
                raise HarnessError(f"could not start {self.binary}: {e.strerror or e}: rebuild the fork with RPC "
                                   f"(`turbo-harness build --rpc`)") from None
        self.starts += 1
        t0 = time.time()
        while time.time() - t0 < wait_s:
            if self.proc.poll() is not None:
                last = self.last_line() or "no message"
                fix = (": --rpc-local takes ggml device names of this build, e.g. --rpc-local CPU (CUDA0, MTL0 "
                       "where built; `turbo-harness doctor` lists the backends)" if "unknown device" in last else "")
                raise HarnessError(f"rpc-server exited at start ({self.exit_text()}): {last}{fix} (log {self.log_path})")
            if reachable(self.endpoint, 1.0):
                return self
            time.sleep(0.1)
        self.stop()
        raise HarnessError(f"rpc-server did not open {self.endpoint} within {wait_s:.0f} s (log {self.log_path})")

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def settle(self, wait_s: float = 3.0) -> bool:
        """Wait up to ``wait_s`` seconds for a server that may be dying (its client saw the connection close a
        moment before the process ended); returns :meth:`alive` afterwards."""
        if self.proc is None:
            return False
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
        return self.alive()

    def exit_text(self) -> str:
        """'running', 'exit code N' or 'killed by SIGKILL'."""
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return "running"
        return f"killed by {_signame(-rc)}" if rc < 0 else f"exit code {rc}"

    def log_text(self) -> str:
        """Everything the server wrote so far ('' when nothing)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def last_line(self) -> str:
        """The most telling line of the server's latest start (an assert or error line, else its last line)."""
        text = self.log_text().split("\n=== ")[-1]
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        telling = [ln for ln in lines if re.search(r"GGML_ASSERT|GGML_ABORT|error|abort|not supported|unsupported|"
                                                   r"Segmentation|failed", ln, re.I)]
        return (telling or lines or [""])[-1][:300]

    def served_devices(self) -> list[str]:
        """The device lines of the server's banner, e.g. ['CPU: AMD EPYC (24105 MiB, 24105 MiB free)']."""
        text = self.log_text().split("\n=== ")[-1]
        m = re.search(r"^Devices:\s*\n((?:[ \t]+\S.*\n?)+)", text, re.M)
        if not m:
            return []
        return [ln.strip() for ln in m.group(1).splitlines()
                if ln.strip() and not re.match(r"(transport|endpoint|local cache)\s*:", ln.strip())]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); a no-op when it is not running."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash or a lost machine would end it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
