"""Speed verdicts only from figures a careful benchmark would judge: one llama-bench repetition (no spread) or a
machine where other work took over half the CPUs around a llama-bench run gives PARTIAL "not judged: ..." naming
the fix, never PASS or FAIL; a real FAIL on a quiet machine with reps >= 2 stays a FAIL.

The sweep runs end to end with a fake llama-bench (tokens/s per -ctk from a JSON file, as many samples as -r asks)
and a fake load average (os.getloadavg and the usable CPU count patched)."""
from __future__ import annotations

import json
import os

import pytest

from harness.checks.sweeps import judge_sweep
from harness.report.model import Verdict
from harness.runners import sweep as S
from tests.test_sweep_parsers import TRAITS
from tests.test_sweep_runner import _script, fake  # noqa: F401  (fake: the fixture of fake tools)

# fake llama-bench: pp64 and tg16 at depth 0, -r samples each of the tokens/s listed for its -ctk in SAMPLES
BENCH = r"""#!/usr/bin/env python3
import json, statistics, sys
a = sys.argv
ctk, reps = a[a.index("-ctk") + 1], int(a[a.index("-r") + 1])
ts = json.load(open({samples!r}))[ctk][:reps]
rows = []
for n_p, n_g in ((64, 0), (0, 16)):
    s = [x * (1 if n_p else 0.5) for x in ts]
    rows.append({{"n_prompt": n_p, "n_gen": n_g, "n_depth": 0, "type_k": ctk, "type_v": ctk,
                 "avg_ts": statistics.mean(s), "stddev_ts": statistics.stdev(s) if len(s) > 1 else 0.0,
                 "samples_ts": s}})
print(json.dumps(rows))
"""


def _sweep(fake, monkeypatch, samples: dict, reps: int, load: float, cpus: int = 2, usable: int = 2):  # noqa: F811
    path = fake.tmp / "samples.json"
    path.write_text(json.dumps(samples))
    _script(fake.tmp / "build" / "bin" / "llama-bench", BENCH.format(samples=str(path)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(S, "usable_cpus", lambda: usable, raising=False)  # raising=False: the test also runs on old code
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    cfg = fake.cfg("q8_0/q8_0,turbo3/turbo3", depths=(0,), reps=reps)
    res = S.run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    cr, sec = judge_sweep(res, traits=TRAITS)
    cell = next(c for c in cr.cells if c.metric == "prefill_ratio_vs_q8_0" and c.type == "turbo3/turbo3")
    return res, cr, cell


QUIET, BUSY = 1.2, 3.8  # 1-min loads on 2 usable CPUs (the tryout's overload was 3.4-4.1)
FAST = {"q8_0": [100.0, 101.0, 99.0], "turbo3": [572.0, 570.0, 574.0]}  # 5.72x: the tryout's absurd PASS
SLOW = {"q8_0": [100.0, 101.0, 99.0], "turbo3": [40.0, 40.5, 39.5]}     # 0.40x: the tryout's FAIL


@pytest.mark.parametrize("samples,reps,load,why", [
    (FAST, 1, QUIET, "1 llama-bench repetition gives no spread"),
    (SLOW, 1, QUIET, "1 llama-bench repetition gives no spread"),
    (FAST, 3, BUSY, "measured with the machine overloaded"),
    (SLOW, 3, BUSY, "measured with the machine overloaded"),
    (SLOW, 1, BUSY, "1 llama-bench repetition gives no spread"),
])
def test_one_repetition_or_an_overloaded_machine_is_never_pass_or_fail(fake, monkeypatch, samples, reps,  # noqa: F811
                                                                      load, why):
    res, cr, c = _sweep(fake, monkeypatch, samples, reps, load)
    assert c.verdict == Verdict.PARTIAL, (c.verdict, c.caveat)
    assert c.caveat.startswith("not judged: ") and why in c.caveat, c.caveat
    assert ("rerun with --reps 3 or more" in c.caveat) == (reps == 1) and ("on a quiet machine" in c.caveat) == (load == BUSY)
    if load == BUSY:  # the load recorded around each llama-bench run names both runs behind the ratio
        ld = res.bench["turbo3/turbo3"].data["load"]
        assert ld["before"]["load_1min"] == BUSY and ld["after"]["usable_cpus"] == 2
        assert "turbo3/turbo3 at 1-min load 3.8 / 3.8 before / after its llama-bench run on 2 CPUs" in c.caveat
        assert "q8_0/q8_0 at 1-min load 3.8" in c.caveat
    assert c.value == pytest.approx(5.72 if samples is FAST else 0.40, rel=0.01)  # the figure is still shown
    assert any("speed of turbo3/turbo3 not judged" in n for n in cr.notes), cr.notes


@pytest.mark.parametrize("samples,reps,want", [(SLOW, 3, Verdict.FAIL), (SLOW, 2, Verdict.FAIL),
                                               (FAST, 3, Verdict.PASS)])
def test_a_quiet_machine_with_repetitions_is_judged(fake, monkeypatch, samples, reps, want):  # noqa: F811
    res, cr, c = _sweep(fake, monkeypatch, samples, reps, QUIET)
    assert c.verdict == want, c.caveat
    assert "not judged" not in c.caveat and not c.details.get("not_judged")


def test_a_cached_record_without_its_own_load_falls_back_to_the_sweeps(fake, monkeypatch):  # noqa: F811
    res, _, c = _sweep(fake, monkeypatch, SLOW, 3, QUIET)
    assert c.verdict == Verdict.FAIL
    for rec in res.bench.values():  # a job cached before the load was recorded with it
        rec.data.pop("load")
    res.meta["load_end"] = {**res.meta["load_end"], "load_1min": 5.0}
    cr, _ = judge_sweep(res, traits=TRAITS)
    c = next(c for c in cr.cells if c.metric == "prefill_ratio_vs_q8_0" and c.type == "turbo3/turbo3")
    assert c.verdict == Verdict.PARTIAL and "at the sweep's start / end on 2 CPUs" in c.caveat, c.caveat


def test_usable_cpus_follows_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert S.usable_cpus() == 1
    assert S.machine_load()["usable_cpus"] == 1


def test_a_cgroup_quota_does_not_make_a_quiet_host_overloaded(fake, monkeypatch):  # noqa: F811
    """/proc/loadavg counts the whole machine (a container's host included): a 2-CPU quota on a 16-CPU host at 1-min
    load 6 is a quiet host, and its speed is judged (review 28b: compared with the quota, every figure was 'not
    judged', so a real FAIL read PARTIAL)."""
    res, cr, c = _sweep(fake, monkeypatch, SLOW, 3, 6.0, cpus=16, usable=2)
    assert c.verdict == Verdict.FAIL and "not judged" not in c.caveat, c.caveat
    from harness.checks.sweep_rules import speed_not_judged
    row = {"pair": "turbo3/turbo3", "reps": 3, "ref_reps": 3}
    busy = {"before": {"load_1min": 17.0, "cpus": 16, "usable_cpus": 2}, "after": {"load_1min": 6.0, "cpus": 16}}
    for rec in res.bench.values():  # the host itself overloaded: not judged, the machine's CPUs named
        rec.data["load"] = busy
    why = speed_not_judged(row, res.bench, {})
    assert why.startswith("not judged: measured with the machine overloaded") and "on 16 CPUs" in why, why


def test_the_sweeps_own_threads_do_not_make_a_quiet_machine_overloaded(fake, monkeypatch):  # noqa: F811
    """The 1-min load counts the sweep's own llama-bench and llama-perplexity threads: on a quiet 2-core machine a
    sweep with 2 threads runs at load about 2-2.5, which the rule 'load above the CPU count' called overloaded, so
    every speed figure of a default sweep could read 'not judged' and a real FAIL PARTIAL (review 28b). Only load
    beyond the sweep's own threads by more than half the CPUs is other work."""
    res, cr, c = _sweep(fake, monkeypatch, SLOW, 3, 2.6)
    assert res.config.threads >= 2
    assert c.verdict == Verdict.FAIL and "not judged" not in c.caveat, c.caveat
    from harness.checks.sweep_rules import speed_not_judged
    row = {"pair": "turbo3/turbo3", "reps": 3, "ref_reps": 3}
    assert speed_not_judged(row, res.bench, {}, own_threads=2) == ""
    assert "other work took over half the CPUs" in speed_not_judged(row, res.bench, {}, own_threads=0)
