"""unmark_folder puts the earlier report back exactly: an earlier report that was itself partial (a sweep stopped by
Ctrl-C, or a run that died) stays INTERRUPTED. Review 28b: it set ``interrupted`` to None, so a Ctrl-C'd partial
sweep whose resume stopped on an error (or a signal before any job ran) read as a finished PASS, exit 0."""
from __future__ import annotations

import json

import pytest

from harness import runlock
from harness.pipeline import load_run
from harness.report.model import Cell, CheckResult, Run, Verdict
from harness.report.render import write_all
from harness.unfinished import mark_folder_running, unmark_folder


def _partial_sweep(d, interrupted):
    run = Run(run_id="sweep-x", meta={"target_backend": "cpu"})
    run.checks.append(CheckResult("SWEEP", "Model-level sweep", [
        Cell("SWEEP", "q8_0/q8_0", "cpu:perplexity", "kld_vs_f16", 0.001, 0.01, Verdict.PASS)]))
    run.interrupted = interrupted
    write_all(run, d)


@pytest.mark.parametrize("earlier", [
    {"signal": "SIGINT", "exit_code": 130, "in_progress": "ppl turbo3/turbo3", "not_run": ["ppl turbo3/turbo3"]},
    {"state": "running", "signal": "x", "exit_code": 130, "not_run": ["SWEEP"], "asked": ["SWEEP"], "pid": 1,
     "since": "2026-01-01T00:00:00Z"},  # a run that died (read back as unfinished)
])
def test_an_interrupted_earlier_report_stays_interrupted(tmp_path, earlier):
    d = tmp_path / "run"
    _partial_sweep(d, earlier)
    before = load_run(d)
    assert before.headline == "INTERRUPTED" and before.exit_code() == 130
    runlock.acquire(d)
    try:
        assert mark_folder_running(d)
        unmark_folder(d)
    finally:
        runlock.release(d)
    data = json.loads((d / "run.json").read_text())
    assert data["verdict"] == "INTERRUPTED", data["verdict"]
    after = load_run(d)
    assert after.headline == "INTERRUPTED" and after.exit_code() == 130
    assert after.interrupted["not_run"] == before.interrupted["not_run"]
