"""Running one of the fork's command-line tools with a timeout, keeping its output as evidence.

The child runs in its own process group so that a hang (timeout) or Ctrl-C kills it and any
children it started; nothing here raises for a failing tool: the caller gets a :class:`ToolResult`
and decides (a crash becomes an ERROR cell, not an exception).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ToolResult:
    """Outcome of one tool call.

    Attributes:
        cmd: argv as run.
        rc: exit status (negative = killed by that signal, None = timed out).
        stdout, stderr: decoded output (UTF-8, errors replaced).
        seconds: wall time in seconds.
        timed_out: True when the call ran past its timeout and was killed.
        env: the TURBO_* / pinned environment variables set for the call.
    """

    cmd: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.rc == 0

    def failure(self) -> str:
        """One line saying why the call failed ('' when it succeeded), quoting the tool's own error."""
        if self.timed_out:
            return f"{Path(self.cmd[0]).name} timed out after {self.seconds:.0f} s (killed)"
        if self.rc == 0:
            return ""
        how = f"exit {self.rc}" if self.rc is not None and self.rc >= 0 else f"killed by signal {-(self.rc or 0)}"
        text = self.stderr + "\n" + self.stdout
        return f"{Path(self.cmd[0]).name} failed ({how}): {error_line(text)}"


_ERR_PATTERNS = [
    r"GGML_ASSERT", r"GGML_ABORT", r"\babort", r"error while handling argument", r"\berror\b", r"failed",
    r"Segmentation fault", r"terminate called", r"exception", r"Unsupported", r"invalid",
]


def error_line(text: str) -> str:
    """The most telling line of a failed tool's output (first line matching an error pattern, else the last
    non-empty line), trimmed to 240 characters; 'no output' when empty."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat in _ERR_PATTERNS:
        for ln in lines:
            if re.search(pat, ln, re.IGNORECASE) and not ln.startswith("common_init_result: fitting"):
                return ln[:240]
    return lines[-1][:240] if lines else "no output"


def run_tool(cmd: list[str], env_set: dict[str, str], timeout: float, evidence_prefix: Path | None = None,
             env_unset: tuple[str, ...] = (), cwd: Path | None = None) -> ToolResult:
    """Run ``cmd`` with ``env_set`` added to the environment (and ``env_unset`` removed).

    Args:
        cmd: argv; cmd[0] is the binary path.
        env_set: variables to set (e.g. TURBO_AUTO_ASYMMETRIC=0).
        timeout: seconds before the whole process group is killed (SIGKILL).
        evidence_prefix: when given, writes ``<prefix>.cmd``, ``.stdout``, ``.stderr``.
        env_unset: variables removed from the inherited environment.
        cwd: working folder of the tool (for tools that write files where they run); default the caller's.

    Returns:
        ToolResult (never raises for a crashing, missing or hanging binary; a missing binary gives rc 127).

    Raises:
        KeyboardInterrupt: re-raised after the child group is killed.
    """
    env = {k: v for k, v in os.environ.items() if k not in env_unset}
    env.update(env_set)
    t0 = time.time()
    timed_out = False
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
                                cwd=cwd)
    except OSError as e:
        res = ToolResult(cmd, 127, "", f"error: cannot execute {cmd[0]}: {e}", time.time() - t0, env=dict(env_set))
        _write_evidence(res, evidence_prefix)
        return res
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        rc, timed_out = None, True
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    res = ToolResult(cmd, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                     time.time() - t0, timed_out, dict(env_set))
    _write_evidence(res, evidence_prefix)
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _write_evidence(res: ToolResult, prefix: Path | None) -> None:
    if prefix is None:
        return
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(res.env.items()))
    status = "timed out" if res.timed_out else f"rc={res.rc}"
    prefix.with_name(prefix.name + ".cmd").write_text(
        f"{envs} {shlex.join(res.cmd)}\n# {status} after {res.seconds:.1f} s\n")
    prefix.with_name(prefix.name + ".stdout").write_text(res.stdout)
    prefix.with_name(prefix.name + ".stderr").write_text(res.stderr)
