"""Issue 22, group 5: each finding's explanation follows from its own evidence, and a root cause several checks
see is said once at the top with the dependent findings pointing to it. NumPy targets with faults and the
sample reports; each test failed on the code before the fix (wrong cause named, no case, no root-cause line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import Unsupported
from harness.reference import turbo as T
from harness.report.findings import findings, headline
from harness.report.model import Run, Verdict
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks

REPO = Path(__file__).resolve().parents[1]


def _run(target, checks, types, tmp_path, name="r"):
    return run_checks(target, checks, types, tmp_path / name, log=lambda s: None)


def _line(run, check, type_=None):
    return next(f.line() for f in findings(run) if f.check == check and (type_ is None or f.type == type_))


def test_all_zero_indices_are_named_as_such(tmp_path):
    """5.1: PQ1 on a quantiser that writes all-zero indices says so (it said 'not a signed WHT')."""
    run = _run(NumpyTarget(faults=["zero_indices"]), ["PQ1"], ["turbo3"], tmp_path)
    line = _line(run, "PQ1", "turbo3")
    assert line.startswith("FAIL") and "the quantiser writes no indices (all zero)" in line
    assert "not a signed WHT" not in line and "rotation is not the signed" not in line


class _NoTurbo2(NumpyTarget):
    """A build without turbo2 (a branch of the family that has none): no traits, every op on it declined."""

    def type_info(self, type_name):
        return None if type_name == "turbo2" else super().type_info(type_name)

    def quantize(self, backend, route, type_name, x):
        if type_name == "turbo2":
            raise Unsupported("this build has no type turbo2")
        return super().quantize(backend, route, type_name, x)


def test_a_type_the_build_lacks_is_not_a_crash(tmp_path):
    """5.2: a type the build lacks is FAIL ('the build has no such type'), never 'the fork crashed'."""
    run = _run(_NoTurbo2(), ["PQ4", "PQ1"], ["turbo2", "turbo3"], tmp_path)
    line = _line(run, "PQ4", "turbo2")
    assert line.startswith("FAIL") and "has no such type" in line
    assert "the fork crashed" not in line and "nothing crashed" in line
    head = headline(run)
    assert head[1].startswith("ROOT 1") and "turbo2" in head[1] and "nothing crashed" in head[1]


def test_unknown_layout_is_not_read_back_wrongly(tmp_path):
    """5.3: a block layout the reference does not know is 'could not be checked', not 'read back wrongly' (nothing
    about reading back was measured)."""
    run = _run(NumpyTarget(formats={"turbo4": T.TurboFormat("turbo4", 4, 128, 66)}), ["PQ4"], ["turbo4"], tmp_path)
    line = _line(run, "PQ4", "turbo4")
    assert "read back wrongly" not in line and "could not be checked" in line


def test_crash_cells_name_their_case(tmp_path):
    """5.4: crash cells name the case that crashed (types, head_dim D, queries nq), not one identical line."""
    run = _run(NumpyTarget(faults=["crash_attention"]), ["PQ6"], ["turbo3"], tmp_path)
    crashed = [c for c in run.checks[0].cells if c.verdict == Verdict.FAIL and c.value is None]
    assert len(crashed) >= 4
    for c in crashed:
        case = c.path.split("[", 1)[1].rstrip("]")  # e.g. 'turbo3/q8_0 D=128 nq=8 h=4/2'
        assert case in c.caveat and "D=" in c.caveat and "nq=" in c.caveat and c.type in c.caveat
    assert len({c.caveat for c in crashed}) == len(crashed)


def test_root_cause_all_zero_indices_said_once_at_the_top(tmp_path):
    """5.5 (all-zero indices): one root-cause line right after the verdict, and the findings of other checks on
    that type point to it."""
    run = _run(NumpyTarget(faults=["zero_indices"]), ["PQ1", "PQ2", "PQ5"], ["turbo3"], tmp_path)
    head = headline(run)
    roots = [ln for ln in head if ln.startswith("ROOT")]
    assert len(roots) == 1 and head[1] == roots[0] and "writes no indices (all zero)" in roots[0]
    dependent = [ln for ln in head[2:] if " PQ2 " in ln or " PQ5 " in ln]
    assert dependent and all(ln.endswith("Follows from root cause 1 above.") for ln in dependent)
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert summary.count("writes no indices (all zero) on") == 1


@pytest.mark.parametrize("sample,evidence", [
    ("sweep-cpu-gemma3", "turbo4 on K only costs +25.0% PPL against q8_0, on V only +1.7%"),
    ("kvreal-cpu-gemma3", "K carries 88% of turbo4's attention-output error, worst in layers 11 and 1")])
def test_root_cause_k_side_loss_on_sweep_and_kvreal(sample, evidence):
    """5.5 (K-side loss): the Gemma 3 sweep and KVREAL reports each say in one sentence that the loss is on the K
    side and where, from their own rows and notes; quality findings with turbo on K point to it, speed ones do not."""
    run = Run.from_dict(json.loads((REPO / "reports" / "samples" / sample / "run.json").read_text()))
    head = headline(run)
    roots = [ln for ln in head if ln.startswith("ROOT")]
    assert len(roots) == 1 and "the loss is on the K side" in roots[0] and evidence in roots[0], roots
    pointing = [ln for ln in head if ln.endswith("Follows from root cause 1 above.")]
    assert pointing and not [ln for ln in pointing if "prefill" in ln]


class _NoToFloat(NumpyTarget):
    """A build whose turbo3 type traits have no to_float (the probe's own message for it)."""

    def decode(self, backend, route, type_name, raw, nrows, ncols):
        if route == "to_float" and type_name == "turbo3":
            from harness.errors import HarnessError
            raise HarnessError("probe call to_float failed: type has no to_float in its traits")
        return super().decode(backend, route, type_name, raw, nrows, ncols)


def test_root_cause_missing_trait_said_once(tmp_path):
    """5.5 (missing trait): every path that needs the missing to_float is SKIP with the probe's reason; one
    root-cause line right after the verdict names the trait once (the cells repeat it 6 times)."""
    run = _run(_NoToFloat(), ["PQ4", "PQ2"], ["turbo3"], tmp_path)
    head = headline(run)
    roots = [ln for ln in head if ln.startswith("ROOT")]
    assert len(roots) == 1 and head[1] == roots[0], head
    assert "turbo3: the build's type traits lack to_float" in roots[0]
