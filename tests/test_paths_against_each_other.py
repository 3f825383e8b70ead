"""Per-path constants compared path against path (spec "Integrity of a verdict" / Paths against each other).

On CUDA (fork 69d8e4be4) the turbo4 thresholds are ±0.145561/±0.013964 and on the CPU ±0.145560/±0.013963:
each within 1e-6 of the reference midpoint, so compared only with the reference both passed silently. A NumPy
target whose GPU path has every threshold moved 1e-6 away from zero reproduces that: PQ2 must compare the
paths' thresholds with each other and COMPAT must quantise enough values (>= 2^20) to see the index flips,
both reporting PARTIAL with the size; the unshifted target and a target with boundary ties alone stay PASS.
"""
from __future__ import annotations

import re

import pytest

from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks

BACKENDS = (("cpu", "cpu"), ("cuda", "gpu"))


def _run(tmp_path, **faults):
    target = NumpyTarget(backends=BACKENDS, backend_faults=faults)
    run = run_checks(target, ["PQ2", "COMPAT"], ["turbo4"], tmp_path / "run", target_backend="cuda", log=lambda s: None)
    return {c.id: c for c in run.checks}


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("shifted"), cuda={"thresholds_shift_1e-6"})


def test_pq2_compares_thresholds_between_paths_and_reports_the_size(shifted):
    pq2 = shifted["PQ2"]
    assert pq2.verdict == Verdict.PARTIAL
    # each path alone is within 1e-6 of the midpoints: the rule cells pass ...
    rule = [c for c in pq2.cells if c.metric == "threshold_abs_err_vs_midpoint"]
    assert rule and all(c.verdict == Verdict.PASS for c in rule)
    # ... but cuda against cpu differs, named with its size and the thresholds
    pairs = [c for c in pq2.cells if c.metric == "thresholds_max_abs_diff_between_paths" and "cuda:set_rows" in c.path]
    assert len(pairs) == 2 and all(c.verdict == Verdict.PARTIAL for c in pairs)
    c = pairs[0]
    assert c.value == pytest.approx(1e-6, rel=0.1)
    assert re.search(r"cuda:set_rows thresholds ±0\.\d{7}(/±0\.\d{7})? vs cpu:\w+ ±0\.\d{7}", c.caveat), c.caveat
    assert "by up to 9.8e-07" in c.caveat or "by up to 1e-06" in c.caveat
    # the two CPU paths share their constants
    cpu = [x for x in pq2.cells if x.metric == "thresholds_max_abs_diff_between_paths" and "cuda" not in x.path]
    assert cpu and all(x.verdict == Verdict.PASS for x in cpu)


def test_compat_resolves_the_flips_and_reports_them_as_partial_with_size_and_cause(shifted):
    compat = shifted["COMPAT"]
    assert compat.verdict == Verdict.PARTIAL
    pair = next(c for c in compat.cells if c.path == "cpu:set_rows x cuda:set_rows")
    assert pair.verdict == Verdict.PARTIAL
    d = pair.details
    assert d["values"] >= 2 ** 20  # enough values to resolve a 1e-5 disagreement rate
    assert d["threshold_flips"] >= 10 and d["real_index_diffs"] == 0
    assert re.search(r"\d+ real index flips per 2\^20 values", pair.caveat), pair.caveat
    assert "cpu:set_rows thresholds ±0.20924" in pair.caveat and "vs cuda:set_rows ±0.20925" in pair.caveat


def test_unshifted_paths_stay_pass(tmp_path):
    checks = _run(tmp_path)
    assert checks["PQ2"].verdict == Verdict.PASS and checks["COMPAT"].verdict == Verdict.PASS
    assert any(c.metric == "thresholds_max_abs_diff_between_paths" for c in checks["PQ2"].cells)


def test_boundary_ties_alone_stay_pass(tmp_path):
    checks = _run(tmp_path, cuda={"boundary_ties"})
    pair = next(c for c in checks["COMPAT"].cells if c.path == "cpu:set_rows x cuda:set_rows")
    assert pair.details["boundary_flips"] > 0 and pair.details["threshold_flips"] == 0
    assert pair.verdict == Verdict.PASS
    assert checks["PQ2"].verdict == Verdict.PASS and checks["COMPAT"].verdict == Verdict.PASS
