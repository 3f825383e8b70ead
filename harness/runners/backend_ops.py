"""Run the fork's own ``test-backend-ops`` on the turbo-related ops and parse its console output.

test-backend-ops compares each non-CPU backend with the CPU backend op by op. It prints the error
value only when a case fails (``[OP] ERR = 0.0123 > 0.0001`` or ``NMSE = ...``); for passing cases
the value is known only to be within the tool's own limit, and the parsed record says so.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

TURBO_OPS = "TURBO_WHT,SET_ROWS,FLASH_ATTN_EXT,GET_ROWS,CPY"

_BACKEND = re.compile(r"^\s*Backend \d+/\d+: (\S+)", re.M)
_CASE = re.compile(r"^\s{2}(\S+?)\((.*)\): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERR = re.compile(r"(ERR|NMSE) = ([0-9.eE+-]+) > ([0-9.eE+-]+)")


@dataclass
class OpResult:
    """One parsed test-backend-ops case."""

    backend: str
    op: str
    params: str
    status: str  # OK | FAIL | not supported | skipped
    metric: str | None = None
    error: float | None = None
    max_error: float | None = None
    note: str = ""


def parse(text: str) -> list[OpResult]:
    """Parse test-backend-ops console output (mode 'test').

    Args: text: the tool's stdout. Returns one OpResult per case line.
    """
    out, backend = [], "?"
    for ln in _ANSI.sub("", text).splitlines():
        m = _BACKEND.match(ln)
        if m:
            backend = m.group(1)
            continue
        m = _CASE.match(ln)
        if not m:
            continue
        op, params, rest = m.groups()
        if "not supported" in rest:
            status = "not supported"
        elif rest.rstrip().endswith("OK"):
            status = "OK"
        elif "FAIL" in rest:
            status = "FAIL"
        elif "skipping" in rest:
            status = "skipped"
        else:
            continue
        r = OpResult(backend, op, params, status)
        e = _ERR.search(rest)
        if e:
            r.metric, r.error, r.max_error = e.group(1), float(e.group(2)), float(e.group(3))
        elif status == "OK":
            r.note = "within the tool's own limit (the tool prints no value for passing cases)"
        out.append(r)
    return out


def is_turbo_related(r: OpResult) -> bool:
    """True for the rotation op and any case whose parameters name a turbo type."""
    return r.op.startswith("TURBO_WHT") or "turbo" in r.params.lower() or "TURBO" in r.op


def run(binary: Path, ops: str = TURBO_OPS, timeout_s: float = 900.0, log_path: Path | None = None) -> dict:
    """Run test-backend-ops in test mode on the turbo-related ops.

    Returns {'results': [OpResult dicts], 'returncode', 'note'}. A crash or timeout is reported in
    'note' with what was parsed before it; the caller turns it into an ERROR cell.
    """
    results, notes, cmds, logs, rcs = [], [], [], [], []
    for op in ops.split(","):
        cmd = [str(binary), "test", "-o", op] + ([] if op == "TURBO_WHT" else ["-p", "turbo"])
        cmds.append(" ".join(cmd))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_env())
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = None
            notes.append(f"{op}: timed out after {timeout_s:.0f} s")
        logs.append(f"$ {' '.join(cmd)}\n{text}")
        rcs.append(rc)
        parsed = [r for r in parse(text) if is_turbo_related(r)]
        results += parsed
        if rc not in (0, None):
            last = [ln for ln in _ANSI.sub("", text).splitlines() if ln.strip()][-1:] or [""]
            notes.append(f"{op}: exited with {rc} ({last[0].strip()[:160]})")
        plain = _ANSI.sub("", text)
        others = [b for b in _BACKEND.findall(plain) if not b.upper().startswith("CPU")]
        if not parsed and rc == 0:
            notes.append(f"{op}: compares other backends with the CPU; this build has only the CPU" if not others
                         else f"{op}: no turbo-related cases in this test-backend-ops")
    if log_path:
        Path(log_path).write_text("\n".join(logs))
    crashed = any(rc not in (0, None) for rc in rcs) or any("timed out" in n for n in notes)
    return {"results": [asdict(r) for r in results], "returncode": 0 if not crashed else 1,
            "note": "; ".join(dict.fromkeys(notes)), "command": "; ".join(cmds)}


def _env():
    import os
    env = dict(os.environ)
    env.setdefault("GGML_NO_BACKTRACE", "1")
    return env
