"""Run the fork's own ``test-backend-ops`` on the turbo-related ops and parse its console output.

test-backend-ops compares each non-CPU backend with the CPU backend op by op. It prints the error
value only when a case fails (``[OP] ERR = 0.0123 > 0.0001`` or ``NMSE = ...``); for passing cases
the value is known only to be within the tool's own limit, and the parsed record says so.
"""
from __future__ import annotations

import itertools
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


_BACKEND = re.compile(r"^\s*Backend \d+/\d+: (\S+)", re.M)
# A case line: "  OP(params): STATUS". A failing case's error comes first on the same line: the compare callback
# prints "[OP] ERR = e > limit " (or a NaN/inf mismatch) while the graphs are compared, and the console printer
# writes the case's own "  OP(params): FAIL" after it (tests/test-backend-ops.cpp: the callback in test_case::eval,
# console_printer::print_test_console), so the case may start mid-line.
_CASE = re.compile(r"^(.*?)\s{2}([A-Z][A-Za-z0-9_]*)\((.*)\): (.*)$")
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

    Args: text: the tool's stdout. Returns one OpResult per case line, a failing one with the error value printed
    before or after its name.
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
        before, op, params, rest = m.groups()
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
        e = _ERR.search(before + " " + rest)
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
    optional regex on the case parameters (``-p``), and the seconds it may take.

    ``split`` names, per parameter, the values to cut the group by (``(("mask=0", "mask=1"), ("prec=f32",
    "prec=def"))``): where several processes may run at once (:func:`jobs`), the group runs as :meth:`parts`, and
    ``timeout_s`` is the budget of the whole group, which its parts share (:func:`run`)."""

    op: str
    params: str | None
    timeout_s: float
    split: tuple[tuple[str, ...], ...] = ()

    def command(self, binary: Path) -> list[str]:
        return [str(binary), "test", "-o", self.op] + (["-p", self.params] if self.params else [])

    def launch(self, binary: Path) -> list[str]:
        """:meth:`command`, line-buffered where coreutils' stdbuf exists: printf into a pipe is block-buffered, and
        a process stopped at its time limit would take the lines of the cases it finished with it."""
        import shutil
        stdbuf = shutil.which("stdbuf")
        return ([stdbuf, "-oL", "-eL"] if stdbuf else []) + self.command(binary)

    def parts(self) -> tuple[Group, ...]:
        """The group as disjoint groups whose cases together are exactly the group's: one per combination of the
        ``split`` values, plus one for every case that has none of the combinations (a parameter missing or with
        another value in this fork's test-backend-ops: usually empty, never lost). Each part's ``-p`` is an
        ECMAScript regex (test-backend-ops filters with std::regex_search on the case's ``k=v,k=v`` string,
        tests/test-backend-ops.cpp ``filter_test_cases``): the group's own regex as a lookahead, then one
        lookahead per value. Two combinations differ in at least one parameter's value, so no case is in two
        parts. Returns ``(self,)`` when there is nothing to split by."""
        if not self.split:
            return (self,)
        base = f"^(?=.*(?:{self.params}))" if self.params else "^"
        combos = ["".join(_var(v) for v in combo) for combo in itertools.product(*self.split)]
        rest = base + "".join(f"(?!{c})" for c in combos)
        return tuple(Group(self.op, base + c, self.timeout_s) for c in combos) + (Group(self.op, rest, self.timeout_s),)


def _var(var: str) -> str:
    """A lookahead for one whole ``key=value`` item of a case's parameter string (never a prefix of another value:
    'nb=3' does not match 'nb=32')."""
    return "(?=.*(?:^|,)" + re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", var) + "(?:,|$))"


def jobs() -> int:
    """How many test-backend-ops processes run at once: the cores divided by the threads of the CPU reference each
    one computes every case with (test-backend-ops makes its comparison backend with ggml_backend_init_by_type and
    sets no thread count, so it gets GGML_DEFAULT_N_THREADS, 4: ggml/include/ggml.h, tests/test-backend-ops.cpp
    ``test_backend``), at least 1. TURBO_BACKEND_OPS_JOBS overrides it (an integer >= 1).

    Raises: HarnessError: TURBO_BACKEND_OPS_JOBS is not an integer >= 1."""
    import os
    v = os.environ.get("TURBO_BACKEND_OPS_JOBS")
    if v is not None:
        if not v.strip().isdigit() or int(v) < 1:
            from harness.errors import HarnessError
            raise HarnessError(f"TURBO_BACKEND_OPS_JOBS={v!r} is not an integer >= 1: set a process count, or unset it")
        return int(v)
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (a container's or taskset's share)
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 4)


# Every turbo-related case: the rotation op, set_rows into turbo types (ggml's generic SET_ROWS cases with a turbo
# destination, and the fork's own SET_ROWS_TURBO3 round-trip test, which the op name alone does not select), flash
# attention, get_rows and cpy with turbo K/V. Flash attention is most of the time on a GPU (528 cases on the pinned
# fork, 54 of COMPAT's 59 s on an H100): where several processes may run, it runs in parts cut by mask, sinks and
# precision (parameters of upstream's test_flash_attn_ext), eight parts of about 40-90 cases on the pinned fork.
FA_SPLIT = (("mask=0", "mask=1"), ("sinks=0", "sinks=1"), ("prec=f32", "prec=def"))
PLAN = (Group("TURBO_WHT", None, 900), Group("SET_ROWS", "turbo", 900), Group("SET_ROWS_TURBO3", None, 900),
        Group("FLASH_ATTN_EXT", "turbo", 900, FA_SPLIT), Group("GET_ROWS", "turbo", 900), Group("CPY", "turbo", 900))

# On a software device (lavapipe runs shaders on the CPU): a flash-attention case takes tens of seconds, so only
# the cases with kv=113 (a partial KV block), no GQA broadcast, one query, no ALiBi and no softcap run (both mask
# and sinks settings, f32 precision: 4 cases; with one or three queries it was 8, of which 4 ran in 180 s on 2
# loaded cores). The other groups are small. Each group has a time limit: what does not finish in it is a SKIP
# 'not run in time' with the count of cases that ran.
SOFTWARE_FA = (r"nr23=\[1,1\],kv=113,nb=1,mask=[01],sinks=[01],max_bias=0\.000000,logit_softcap=0\.000000,"
               r"prec=f32,type_KV=turbo")
SOFTWARE_PLAN = (Group("TURBO_WHT", None, 120), Group("SET_ROWS", "turbo", 120), Group("SET_ROWS_TURBO3", None, 120),
                 Group("FLASH_ATTN_EXT", SOFTWARE_FA, 180), Group("GET_ROWS", "turbo", 120), Group("CPY", "turbo", 120))


def run(binary: Path, plan: tuple[Group, ...] = PLAN, log_path: Path | None = None, env: dict | None = None,
        n_jobs: int | None = None, stop: threading.Event | None = None) -> dict:
    """Run test-backend-ops in test mode, one process per group of the plan (per part of a group, when several
    processes run at once).

    Args:
        binary: the test-backend-ops executable. plan: the groups (:data:`PLAN`, or :data:`SOFTWARE_PLAN` for a
            software device). log_path: where the console output goes. env: the process environment (default the
            harness's; a Vulkan build on a software device needs GGML_VK_VISIBLE_DEVICES, :mod:`harness.fork.vulkan`).
        n_jobs: processes at once (default :func:`jobs`); with 1 the groups run one after another, unsplit.
        stop: when set, the running processes are killed and nothing more starts (an interrupted verify).
    A group's ``timeout_s`` is its budget in wall seconds from the start of its first process: a split group's
    parts share it (each part may run until the group's deadline, and a part whose turn comes after it is not
    started), so a group never runs longer than its limit whatever its number of parts.
    Returns:
        {'results': [OpResult dicts], 'returncode': 0, or 1 when a group crashed or exited non-zero, 'note',
        'command', 'jobs', 'listing_s' (seconds spent checking the parts, :func:`checked_parts`), 'groups': [{'op',
        'params', 'status': 'ran' | 'not run in time' | 'exited N', 'cases': cases parsed, 'seconds' (wall, first
        part's start to last part's end), 'limit_s' (the group's budget), 'parts', 'part_seconds' (each part's wall,
        when split), 'parts_not_started' (parts whose turn came after the group's deadline)}]}. A
        group past its time limit is not a failure: its status says so, with the count of cases that ran before it
        was stopped.
        Results come in plan order, a split group's part by part.
    """
    from concurrent.futures import ThreadPoolExecutor
    n_jobs = jobs() if n_jobs is None else max(1, n_jobs)
    notes: list[str] = []
    t0 = time.monotonic()
    split = {i: checked_parts(binary, g, env, n_jobs, notes) if n_jobs > 1 else (g,) for i, g in enumerate(plan)}
    listing_s = round(time.monotonic() - t0, 1)
    tasks = [(i, part) for i in range(len(plan)) for part in split[i]]
    deadlines: dict[int, float] = {}  # per group: its first part's start + the group's limit, shared by its parts
    lock = threading.Lock()

    def deadline(i: int) -> float:
        with lock:
            return deadlines.setdefault(i, time.monotonic() + plan[i].timeout_s)

    def one(t):
        return _one(binary, t[1], env, stop, lambda: deadline(t[0]))
    if n_jobs > 1:
        with ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="test-backend-ops") as ex:
            done = list(ex.map(one, tasks))
    else:
        done = [one(t) for t in tasks]
    results, cmds, logs, groups = [], [], [], []
    for i, g in enumerate(plan):
        mine = [d for (j, _), d in zip(tasks, done) if j == i]
        cmds.append(" ".join(g.command(binary)) + (f" (in {len(mine)} parts)" if len(mine) > 1 else ""))
        parsed, statuses = [], []
        for d in mine:
            logs.append(f"$ {' '.join(d['cmd'])}\n{d['text']}")
            parsed += [r for r in parse(d["text"]) if is_turbo_related(r)]
            statuses.append(d["status"])
        results += parsed
        status = next((s for s in statuses if s.startswith("exited")), None) or \
            ("not run in time" if "not run in time" in statuses else "ran")
        ran = [d for d in mine if d.get("started", True)] or mine  # a part never started adds no wall time
        secs = max(d["end"] for d in ran) - min(d["start"] for d in ran)
        unstarted = sum(1 for d in mine if not d.get("started", True) and d["status"] == "not run in time")
        groups.append({"op": g.op, "params": g.params, "status": status, "cases": len(parsed), "seconds": round(secs, 1),
                       "limit_s": g.timeout_s, "parts": len(mine),
                       **({"part_seconds": [round(d["end"] - d["start"], 1) for d in mine],
                           "parts_not_started": unstarted} if len(mine) > 1 else {})})
        if status == "not run in time":
            shared = (f" shared by its {len(mine)} parts, then stopped"
                      + (f"; {unstarted} part{'s' if unstarted != 1 else ''} not started" if unstarted else "")
                      if len(mine) > 1 else ", then stopped")
            notes.append(f"{g.op}: not run in time ({len(parsed)} cases run in {g.timeout_s:g} s{shared})")
        elif status != "ran":
            text = next(d["text"] for d in mine if d["status"] == status)
            last = [ln for ln in _ANSI.sub("", text).splitlines() if ln.strip()][-1:] or [""]
            notes.append(f"{g.op}: {status.replace('exited', 'exited with')} ({last[0].strip()[:160]})")
        plain = _ANSI.sub("", "".join(d["text"] for d in mine))
        others = [b for b in _BACKEND.findall(plain) if not b.upper().startswith("CPU")]
        if not parsed and status == "ran":
            notes.append(f"{g.op}: compares other backends with the CPU; this build has only the CPU" if not others
                         else f"{g.op}: no turbo-related cases in this test-backend-ops")
    if log_path:
        Path(log_path).write_text("\n".join(logs))
    crashed = any(gr["status"].startswith("exited") for gr in groups)
    return {"results": [asdict(r) for r in results], "returncode": 1 if crashed else 0,
            "note": "; ".join(dict.fromkeys(notes)), "command": "; ".join(cmds), "groups": groups, "jobs": n_jobs,
            "listing_s": listing_s}


def checked_parts(binary: Path, g: Group, env: dict | None, n_jobs: int, notes: list[str]) -> tuple[Group, ...]:
    """The group's :meth:`Group.parts` when the tool itself shows they hold exactly the group's cases, else the group
    whole (a note in ``notes`` says why): test-backend-ops' ``support`` mode on the CPU backend lists the cases a
    ``-o``/``-p`` selects without running them, so the whole group's list and the parts' lists are compared (about
    0.3 s a listing on the pinned fork). This guards against a std::regex that reads the parts' lookaheads otherwise
    than libstdc++ does: a lost case would be a case never tested."""
    from concurrent.futures import ThreadPoolExecutor
    parts = g.parts()
    if len(parts) == 1:
        return parts
    with ThreadPoolExecutor(max_workers=n_jobs) as ex:
        whole, *lists = ex.map(lambda q: _listed(binary, q, env), (g,) + parts)
    if whole is None or any(x is None for x in lists):
        notes.append(f"{g.op}: ran whole (its case list could not be read in support mode to check the parts)")
        return (g,)
    if sorted(c for x in lists for c in x) != sorted(whole):
        notes.append(f"{g.op}: ran whole (its {len(parts)} parts list {sum(map(len, lists))} cases, the group "
                     f"{len(whole)}: this tool's regex reads the parts otherwise)")
        return (g,)
    return parts


def _listed(binary: Path, g: Group, env: dict | None) -> list[str] | None:
    """The parameter strings of the cases a group selects, as ``test-backend-ops support -b CPU`` lists them; None
    when the tool cannot list them (it fails, or lists none while the group is split)."""
    cmd = [str(binary), "support", "-b", "CPU", "-o", g.op] + (["-p", g.params] if g.params else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120, env=_env(env))
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return [m.group(3) for m in map(_CASE.match, _ANSI.sub("", p.stdout).splitlines()) if m and m.group(2) == g.op]


def _one(binary: Path, g: Group, env: dict | None, stop: threading.Event | None, deadline=None) -> dict:
    """One test-backend-ops process to its end, its deadline or ``stop``: {'cmd', 'text' (stdout, then stderr),
    'status' ('ran' | 'not run in time' | 'exited N' | 'exited (stopped ...)'), 'started' (False when its turn came
    at or after the deadline: nothing ran), 'start', 'end' (time.monotonic seconds)}. ``deadline``: called once at
    its turn, the time.monotonic() by which it must end (its group's, shared by the group's parts); default its own
    start + ``g.timeout_s``. An exception while it runs (a signal in the harness) kills it before going on up."""
    t0 = time.monotonic()
    if stop is not None and stop.is_set():  # stopped before its turn: nothing starts
        return {"cmd": g.command(binary), "text": "", "status": "exited (stopped: verify interrupted)", "start": t0,
                "end": t0, "started": False}
    end_by = deadline() if deadline is not None else t0 + g.timeout_s
    if t0 >= end_by:  # the group's budget is spent: this part's cases are not run
        return {"cmd": g.command(binary), "text": "", "status": "not run in time", "start": t0, "end": t0,
                "started": False}
    p = subprocess.Popen(g.launch(binary), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace", env=_env(env))
    try:
        while True:
            try:
                out, err = p.communicate(timeout=0.5)  # a retried communicate() loses no output (subprocess docs)
                rc = p.returncode
                break
            except subprocess.TimeoutExpired:
                if (stop is not None and stop.is_set()) or time.monotonic() > end_by:
                    p.kill()
                    out, err = p.communicate()
                    rc = "stopped" if stop is not None and stop.is_set() else "late"
                    break
    except BaseException:
        p.kill()
        p.wait()
        raise
    status = ("ran" if rc == 0 else "not run in time" if rc == "late" else "exited (stopped: verify interrupted)"
              if rc == "stopped" else f"exited {rc}")
    return {"cmd": g.command(binary), "text": (out or "") + (err or ""), "status": status, "start": t0,
            "end": time.monotonic(), "started": True}


def _env(env: dict | None = None):
    import os
    env = dict(os.environ if env is None else env)
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env.setdefault("OMP_WAIT_POLICY", "passive")  # idle OpenMP threads sleep (see harness/fork/probe.py Probe._start)
    return env
