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


@dataclass(frozen=True)
class Group:
    """One test-backend-ops process: an op (``-o``; an op name or a test's own name such as SET_ROWS_TURBO3), an
    optional regex on the case parameters (``-p``), and the seconds it may take."""

    op: str
    params: str | None
    timeout_s: float

    def command(self, binary: Path) -> list[str]:
        return [str(binary), "test", "-o", self.op] + (["-p", self.params] if self.params else [])

    def launch(self, binary: Path) -> list[str]:
        """:meth:`command`, line-buffered where coreutils' stdbuf exists: printf into a pipe is block-buffered, and
        a process stopped at its time limit would take the lines of the cases it finished with it."""
        import shutil
        stdbuf = shutil.which("stdbuf")
        return ([stdbuf, "-oL", "-eL"] if stdbuf else []) + self.command(binary)


# Every turbo-related case: the rotation op, set_rows into turbo types (ggml's generic SET_ROWS cases with a turbo
# destination, and the fork's own SET_ROWS_TURBO3 round-trip test, which the op name alone does not select), flash
# attention, get_rows and cpy with turbo K/V.
PLAN = (Group("TURBO_WHT", None, 900), Group("SET_ROWS", "turbo", 900), Group("SET_ROWS_TURBO3", None, 900),
        Group("FLASH_ATTN_EXT", "turbo", 900), Group("GET_ROWS", "turbo", 900), Group("CPY", "turbo", 900))

# On a software device (lavapipe runs shaders on the CPU): a flash-attention case takes tens of seconds, so only
# the cases with kv=113 (a partial KV block), no GQA broadcast, one query, no ALiBi and no softcap run (both mask
# and sinks settings, f32 precision: 4 cases; with one or three queries it was 8, of which 4 ran in 180 s on 2
# loaded cores). The other groups are small. Each group has a time limit: what does not finish in it is a SKIP
# 'not run in time' with the count of cases that ran.
SOFTWARE_FA = (r"nr23=\[1,1\],kv=113,nb=1,mask=[01],sinks=[01],max_bias=0\.000000,logit_softcap=0\.000000,"
               r"prec=f32,type_KV=turbo")
SOFTWARE_PLAN = (Group("TURBO_WHT", None, 120), Group("SET_ROWS", "turbo", 120), Group("SET_ROWS_TURBO3", None, 120),
                 Group("FLASH_ATTN_EXT", SOFTWARE_FA, 180), Group("GET_ROWS", "turbo", 120), Group("CPY", "turbo", 120))


def run(binary: Path, plan: tuple[Group, ...] = PLAN, log_path: Path | None = None, env: dict | None = None) -> dict:
    """Run test-backend-ops in test mode, one process per group of the plan.

    Args:
        binary: the test-backend-ops executable. plan: the groups (:data:`PLAN`, or :data:`SOFTWARE_PLAN` for a
            software device). log_path: where the console output goes. env: the process environment (default the
            harness's; a Vulkan build on a software device needs GGML_VK_VISIBLE_DEVICES, :mod:`harness.fork.vulkan`).
    Returns:
        {'results': [OpResult dicts], 'returncode': 0, or 1 when a group crashed or exited non-zero, 'note',
        'command', 'groups': [{'op', 'params', 'status': 'ran' | 'not run in time' | 'exited N', 'cases': cases
        parsed, 'seconds', 'limit_s'}]}. A group past its time limit is not a failure: its status says so, with
        the count of cases that ran before it was stopped.
    """
    import time
    results, notes, cmds, logs, groups = [], [], [], [], []
    for g in plan:
        cmd = g.command(binary)
        cmds.append(" ".join(cmd))
        t0 = time.time()
        try:
            p = subprocess.run(g.launch(binary), capture_output=True, text=True, timeout=g.timeout_s, env=_env(env))
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = None
        secs = time.time() - t0
        logs.append(f"$ {' '.join(cmd)}\n{text}")
        parsed = [r for r in parse(text) if is_turbo_related(r)]
        results += parsed
        status = "ran" if rc == 0 else ("not run in time" if rc is None else f"exited {rc}")
        groups.append({"op": g.op, "params": g.params, "status": status, "cases": len(parsed), "seconds": round(secs, 1),
                       "limit_s": g.timeout_s})
        if rc is None:
            notes.append(f"{g.op}: not run in time ({len(parsed)} cases run in {g.timeout_s:.0f} s, then stopped)")
        elif rc != 0:
            last = [ln for ln in _ANSI.sub("", text).splitlines() if ln.strip()][-1:] or [""]
            notes.append(f"{g.op}: exited with {rc} ({last[0].strip()[:160]})")
        plain = _ANSI.sub("", text)
        others = [b for b in _BACKEND.findall(plain) if not b.upper().startswith("CPU")]
        if not parsed and rc == 0:
            notes.append(f"{g.op}: compares other backends with the CPU; this build has only the CPU" if not others
                         else f"{g.op}: no turbo-related cases in this test-backend-ops")
    if log_path:
        Path(log_path).write_text("\n".join(logs))
    crashed = any(gr["status"].startswith("exited") for gr in groups)
    return {"results": [asdict(r) for r in results], "returncode": 1 if crashed else 0,
            "note": "; ".join(dict.fromkeys(notes)), "command": "; ".join(cmds), "groups": groups}


def _env(env: dict | None = None):
    import os
    env = dict(os.environ if env is None else env)
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env.setdefault("OMP_WAIT_POLICY", "passive")  # idle OpenMP threads sleep (see harness/fork/probe.py Probe._start)
    return env
