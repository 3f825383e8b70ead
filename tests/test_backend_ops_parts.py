"""test-backend-ops in parts and beside the other checks (issue 23: `verify --target cuda` in 30 s): the parts of a
split group hold exactly the group's cases, the runner merges them back into one group, an interrupted run kills its
processes, and verify begins COMPAT's run before the first check only where cores are spare."""
from __future__ import annotations

import itertools
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.runners import backend_ops as bo

# Case strings shaped as upstream's test_flash_attn_ext prints them, over every value the split names, plus cases the
# split cannot place (no sinks parameter, another precision) and cases of another type that the group's own -p drops.
CASES = [f"hsk=128,hsv=128,nh=4,nr23=[1,1],kv={kv},nb={nb},mask={m},sinks={s},max_bias=0.000000,prec={p},"
         f"type_KV={t},permute=[0,1,2,3]"
         for kv, nb, m, s, p, t in itertools.product((113, 512), (3, 32), (0, 1), (0, 1), ("f32", "def"),
                                                     ("turbo3", "q8_0"))]
CASES += ["hsk=128,hsv=128,nb=3,mask=1,prec=f32,type_KV=turbo3", "hsk=128,nb=3,mask=0,sinks=1,prec=f16,type_KV=turbo2"]
TURBO = [c for c in CASES if "turbo" in c]
FA = next(g for g in bo.PLAN if g.op == "FLASH_ATTN_EXT")


def _exe(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_the_parts_of_a_split_group_hold_each_of_its_cases_exactly_once():
    parts = FA.parts()
    assert len(parts) == 9  # 2 x 2 x 2 combinations and the rest
    seen = [[c for c in CASES if re.search(p.params, c)] for p in parts]
    flat = [c for s in seen for c in s]
    assert sorted(flat) == sorted(TURBO)  # nothing lost, nothing twice, nothing the group's own regex drops
    assert seen[-1] == TURBO[-2:]  # what the split cannot place goes to the last part
    assert all(len(s) == 4 for s in seen[:-1])
    # a value is matched whole: nb=3 is not nb=32
    nb = bo.Group("X", None, 1, (("nb=3", "nb=32"),)).parts()
    assert [sum(bool(re.search(p.params, c)) for c in CASES) for p in nb] == [34, 32, 0]


def test_an_unsplit_group_is_its_own_part_and_its_command_is_unchanged():
    g = bo.Group("SET_ROWS", "turbo", 5)
    assert g.parts() == (g,)
    assert g.command(Path("t")) == ["t", "test", "-o", "SET_ROWS", "-p", "turbo"]


def _fake_tool(tmp_path: Path, crash_on: str | None = None, sleep: float = 0.0, lose: bool = False) -> Path:
    """A fake test-backend-ops that prints, for FLASH_ATTN_EXT, the cases of CASES its -p selects (Python's re reads
    these lookaheads as std::regex's ECMAScript does), in 'test' mode and in 'support' mode (the listing), and records
    each test-mode call. ``lose``: its regex drops the first case of every part (as a foreign std::regex might)."""
    calls = tmp_path / "calls"
    calls.mkdir(exist_ok=True)
    return _exe(tmp_path / "test-backend-ops", f"""import os, re, sys, time
args = sys.argv[1:]
mode = args[0]
op = args[args.index('-o') + 1]
pat = args[args.index('-p') + 1] if '-p' in args else ''
if mode == 'test':
    open(os.path.join({str(calls)!r}, str(os.getpid())), 'w').write(op + '\\t' + pat)
    print('Backend 1/2: CUDA0', flush=True)
    time.sleep({sleep})
else:
    print('Backend 1/2: CPU', flush=True)
if op == 'FLASH_ATTN_EXT':
    sel = [c for c in {CASES!r} if re.search(pat, c)]
    for c in sel[1:] if {lose!r} and pat.startswith('^') else sel:
        print('  FLASH_ATTN_EXT(' + c + '): ' + ('OK' if mode == 'test' else 'SUPPORTED'), flush=True)
    if mode == 'test' and {crash_on!r} and re.search({crash_on!r}, pat):
        print('GGML_ASSERT failed', flush=True); sys.exit(134)
""")


def test_run_in_parts_merges_them_into_one_group_with_every_case(tmp_path):
    fake = _fake_tool(tmp_path)
    plan = (FA, bo.Group("SET_ROWS", "turbo", 5))
    res = bo.run(fake, plan=plan, log_path=tmp_path / "tbo.log", n_jobs=3)
    assert res["jobs"] == 3 and res["returncode"] == 0
    fa, sr = res["groups"]
    assert (fa["parts"], fa["cases"], fa["status"]) == (9, len(TURBO), "ran")
    assert sr["parts"] == 1 and "in 9 parts" in res["command"]
    assert sorted(r["params"] for r in res["results"]) == sorted(TURBO)
    assert len(list((tmp_path / "calls").iterdir())) == 10
    assert (tmp_path / "tbo.log").read_text().count("$ ") == 10
    one = bo.run(fake, plan=plan, n_jobs=1)  # one at a time: the group whole, as before
    assert one["groups"][0]["parts"] == 1 and one["groups"][0]["cases"] == len(TURBO)


def test_a_crashed_part_makes_the_group_exited_and_the_run_failed(tmp_path):
    fake = _fake_tool(tmp_path, crash_on=r"mask=1\(")
    res = bo.run(fake, plan=(FA,), n_jobs=2)
    assert res["groups"][0]["status"] == "exited 134" and res["returncode"] == 1
    assert "FLASH_ATTN_EXT: exited with 134 (GGML_ASSERT failed)" in res["note"]


def test_a_set_stop_kills_the_running_processes(tmp_path):
    fake = _fake_tool(tmp_path, sleep=60)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    res = bo.run(fake, plan=(bo.Group("SET_ROWS", "turbo", 120),), n_jobs=2, stop=stop)
    assert time.monotonic() - t0 < 30  # stopped, not waited out (the fake sleeps 60 s)
    assert res["groups"][0]["status"].startswith("exited (stopped")
    pid = int(next((tmp_path / "calls").iterdir()).name)
    assert subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode != 0


def test_jobs_follow_the_cores_and_the_override(monkeypatch):
    monkeypatch.delenv("TURBO_BACKEND_OPS_JOBS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert bo.jobs() == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert bo.jobs() == 1
    monkeypatch.setenv("TURBO_BACKEND_OPS_JOBS", "3")
    assert bo.jobs() == 3
    monkeypatch.setenv("TURBO_BACKEND_OPS_JOBS", "0")
    with pytest.raises(HarnessError, match="TURBO_BACKEND_OPS_JOBS"):
        bo.jobs()


@pytest.mark.parametrize("jobs,started", [("1", False), ("4", True)])
def test_verify_begins_compat_test_backend_ops_before_the_first_check_only_with_cores_to_spare(
        tmp_path, monkeypatch, jobs, started):
    from harness.targets.numpy_target import NumpyTarget
    from harness.verify import run_checks
    monkeypatch.setenv("TURBO_BACKEND_OPS_JOBS", jobs)
    order = []

    class T(NumpyTarget):
        def start_backend_ops(self, log_path=None):
            order.append(("start", Path(log_path).name))
            return True

        def backend_ops(self, log_path=None):
            order.append(("wait", Path(log_path).name))
            return None

    run = run_checks(T(), ["PQ1", "COMPAT"], ["turbo3"], tmp_path / "run", log=lambda s: None)
    assert [c.id for c in run.checks] == ["PQ1", "COMPAT"]
    expect = [("start", "test-backend-ops.log")] if started else []
    assert order == expect + [("wait", "test-backend-ops.log")]


@pytest.mark.fork
def test_the_real_tool_puts_each_flash_attention_case_in_exactly_one_part():
    """With the fork's own test-backend-ops (its `support` mode on the CPU lists the cases a -p selects without
    running them): the parts of the flash-attention group, cut by std::regex, hold the group's cases exactly once."""
    from tests.conftest import fork_build_or_skip
    bdir, _ = fork_build_or_skip()
    exe = bdir / "bin" / "test-backend-ops"
    if not exe.is_file():
        pytest.skip(f"{exe} not built")

    def listed(pattern):
        out = subprocess.run([str(exe), "support", "-b", "CPU", "-o", FA.op, "-p", pattern], capture_output=True,
                             text=True, timeout=120).stdout
        return [ln.split("(", 1)[1].rsplit("):", 1)[0] for ln in out.splitlines() if ln.startswith(f"  {FA.op}(")]
    whole = listed(FA.params)
    parts = [listed(p.params) for p in FA.parts()]
    assert whole, "the fork lists no turbo flash-attention case"
    assert sorted(c for p in parts for c in p) == sorted(whole)


@pytest.mark.fork
def test_a_fork_target_waits_for_the_run_it_began_and_runs_anew_for_another_log(fork_target, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_BACKEND_OPS_JOBS", "2")
    if not (fork_target.build_dir / "bin" / "test-backend-ops").is_file():
        pytest.skip("test-backend-ops not built")
    calls = []
    real = bo.run
    monkeypatch.setattr(bo, "run", lambda *a, **k: calls.append(k.get("log_path")) or real(*a, **k))
    log = tmp_path / "a.log"
    assert fork_target.start_backend_ops(log) is True
    res = fork_target.backend_ops(log)
    assert calls == [log] and res["jobs"] == 2 and log.is_file()
    assert [g["op"] for g in res["groups"]] == [g.op for g in bo.PLAN]
    fork_target.backend_ops(tmp_path / "b.log")  # nothing begun for this one: it runs now
    assert calls == [log, tmp_path / "b.log"]


def test_parts_that_the_tool_lists_otherwise_run_whole_with_a_note(tmp_path):
    fake = _fake_tool(tmp_path, lose=True)
    res = bo.run(fake, plan=(FA,), n_jobs=4)
    fa = res["groups"][0]
    assert fa["parts"] == 1 and fa["cases"] == len(TURBO)  # the whole group ran: no case lost
    assert "FLASH_ATTN_EXT: ran whole (its 9 parts list" in res["note"]


def test_a_failing_case_whose_error_the_fork_prints_before_its_name_is_a_failure(tmp_path):
    """The pinned fork prints '[OP] ERR = e > limit ' during the compare, then '  OP(params): FAIL' on the same line
    (tests/test-backend-ops.cpp): the case is parsed with its error, and a group stopped at its time limit after it
    is never a PASS."""
    from types import SimpleNamespace
    from harness.checks.compat_tables import backend_ops_cells
    fail = ("[FLASH_ATTN_EXT] ERR = 0.012345678 > 0.000500000   "
            "  FLASH_ATTN_EXT(hsk=128,nr23=[1,1],mask=1,prec=f32,type_KV=turbo3): \x1b[1;31mFAIL\x1b[0m")
    ok = "  FLASH_ATTN_EXT(hsk=128,nr23=[1,1],mask=0,prec=f32,type_KV=turbo3): \x1b[1;32mOK\x1b[0m"
    parsed = bo.parse(f"Backend 1/2: CUDA0\n{fail}\n{ok}\n")
    assert [(r.status, r.error, r.max_error) for r in parsed] == [("FAIL", 0.012345678, 0.0005), ("OK", None, None)]
    fake = _exe(tmp_path / "test-backend-ops", f"""import time
print('Backend 1/2: CUDA0', flush=True)
print({ok!r}, flush=True)
print({fail!r}, flush=True)
time.sleep(60)
""")
    res = bo.run(fake, plan=(bo.Group("FLASH_ATTN_EXT", "turbo", 2),), n_jobs=1)
    ctx = SimpleNamespace(evidence_dir=None, target=SimpleNamespace(backend_ops=lambda log_path=None: res))
    cells, _ = backend_ops_cells(ctx)
    judged = next(c for c in cells if c.metric == "failed_cases")
    assert judged.value == 1 and judged.verdict.value == "PARTIAL"


def test_an_exception_while_one_runs_kills_it(tmp_path):
    import os
    import signal
    fake = _fake_tool(tmp_path, sleep=60)

    class Stop(Exception):
        pass

    def boom(*_):
        raise Stop()
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(Stop):
            bo.run(fake, plan=(bo.Group("SET_ROWS", "turbo", 120),), n_jobs=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(next((tmp_path / "calls").iterdir()).name)
    assert subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode != 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.fork
def test_an_error_in_the_run_begun_early_reaches_the_check_that_waits(fork_target, tmp_path, monkeypatch):
    if not (fork_target.build_dir / "bin" / "test-backend-ops").is_file():
        pytest.skip("test-backend-ops not built")

    def broken(*a, **k):
        raise HarnessError("the tool could not be run")
    monkeypatch.setattr(bo, "run", broken)
    assert fork_target.start_backend_ops(tmp_path / "c.log") is True
    with pytest.raises(HarnessError, match="could not be run"):
        fork_target.backend_ops(tmp_path / "c.log")


def test_a_split_groups_time_limit_is_one_budget_its_parts_share(tmp_path):
    """Each of a split group's 9 parts had the group's whole limit, so with 2 processes at once the group could run
    about ceil(9/2) x its limit while its note said 'cases run in <limit> s'. Here each part takes 1 s and the group
    has 1.6 s: the first two parts finish, the next two are stopped at the group's deadline, the rest never start."""
    fake = _fake_tool(tmp_path, sleep=1.0)
    limit = 1.6
    g = bo.Group(FA.op, FA.params, limit, FA.split)
    t0 = time.monotonic()
    res = bo.run(fake, plan=(g,), n_jobs=2)
    wall = time.monotonic() - t0 - res["listing_s"]
    fa = res["groups"][0]
    assert fa["parts"] == 9 and fa["status"] == "not run in time", fa
    assert fa["seconds"] <= limit + 1.0 and wall <= limit + 2.0, (fa, wall)  # the limit, plus a kill's poll interval
    assert fa["cases"] < len(TURBO) and fa["parts_not_started"] >= 3
    started = len(list((tmp_path / "calls").iterdir()))
    assert started == 9 - fa["parts_not_started"]  # a part not started ran no process
    assert (f"FLASH_ATTN_EXT: not run in time ({fa['cases']} cases run in 1.6 s shared by its 9 parts, then stopped; "
            f"{fa['parts_not_started']} parts not started)") in res["note"]
    # unsplit (one process at a time) the group has the same budget
    one = bo.run(fake, plan=(bo.Group("SET_ROWS", "turbo", 0.5),), n_jobs=1)
    assert one["groups"][0]["status"] == "not run in time" and "(0 cases run in 0.5 s, then stopped)" in one["note"]


def test_the_skip_cell_of_a_stopped_split_group_names_its_parts_not_started(tmp_path, make_ctx):
    """The SKIP cell of a group stopped at its limit said 'N cases ran in the L s limit' without saying that the limit
    was shared by the group's parts and that some parts never started (fewer cases tested than the group has)."""
    from harness.checks.compat_tables import backend_ops_cells
    from harness.report.model import Verdict
    from harness.targets.numpy_target import NumpyTarget
    res = bo.run(_fake_tool(tmp_path, sleep=1.0), plan=(bo.Group(FA.op, FA.params, 1.6, FA.split),), n_jobs=2)
    assert res["groups"][0]["parts_not_started"] >= 3

    class T(NumpyTarget):
        def backend_ops(self, log_path=None):
            return res
    cells, _ = backend_ops_cells(make_ctx(T(), types=("turbo3",)))
    skip = [c for c in cells if c.verdict == Verdict.SKIP]
    n = res["groups"][0]["parts_not_started"]
    assert len(skip) == 1 and f"limit shared by its parts ({n} of them not started)" in skip[0].caveat, skip[0].caveat
