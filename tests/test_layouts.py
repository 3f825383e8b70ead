"""Block layouts the reference does not know: one clear PQ4 finding and SKIPs with that reason, never a
harness exception; legacy 32-value blocks are measured; each target carries its own layouts."""
import numpy as np
import pytest

from harness.reference import turbo as T
from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget
from harness.verify import all_checks, run_checks

TURBO4_66 = T.TurboFormat("turbo4", 4, 128, 66)  # half norm + 64 bytes of nibbles: no rnorm field
REASON = "turbo4: 128 values in 66 bytes, no known layout"


def cells(run):
    return [c for ch in run.checks for c in ch.cells]


def no_harness_errors(run):
    assert not [ch.error for ch in run.checks if ch.error]
    errs = [c for c in cells(run) if c.verdict == Verdict.ERROR]
    assert not errs, [(c.check, c.path, c.caveat) for c in errs[:3]]


def test_66_byte_turbo4_is_one_finding_and_skips(tmp_path):
    tgt = NumpyTarget(formats={"turbo4": TURBO4_66})
    assert tgt.type_info("turbo4") == {"block_size": 128, "type_size": 66}
    run = run_checks(tgt, list(all_checks()), ["turbo3", "turbo4"], tmp_path / "r", log=lambda s: None)
    no_harness_errors(run)
    pq4 = next(ch for ch in run.checks if ch.id == "PQ4")
    findings = [c for c in pq4.cells if c.verdict == Verdict.FAIL]
    assert len(findings) == 1 and findings[0].type == "turbo4" and REASON in findings[0].caveat
    t4 = [c for c in cells(run) if "turbo4" in c.type and c not in findings]
    assert t4 and all(c.verdict == Verdict.SKIP and REASON in c.caveat for c in t4)
    # turbo3 is still judged, and the run says why turbo4 was not
    assert any(c.type == "turbo3" and c.verdict == Verdict.PASS for ch in run.checks if ch.id != "PQ4" for c in ch.cells)
    assert run.meta["layout_notes"] and REASON in run.meta["layout_notes"][0]
    assert run.exit_code() == 1 and REASON in (tmp_path / "r" / "summary.md").read_text()


def test_unknown_layout_bytes_never_reach_the_reference_unpacker():
    # what the harness did before: unpack 66-byte blocks as 68-byte ones
    raw = NumpyTarget(formats={"turbo4": TURBO4_66}).quantize("cpu", "set_rows", "turbo4", np.ones((4, 128), np.float32))
    with pytest.raises(ValueError):
        T.unpack("turbo4", raw[:66 * 3])
    lay = T.select_layouts({"turbo4": {"block_size": 128, "type_size": 66}})
    with T.layouts_in_use(lay), pytest.raises(T.UnknownLayout, match=REASON):
        T.unpack("turbo4", raw)


def test_32_value_turbo3_blocks_are_measured_with_the_legacy_layout(tmp_path):
    legacy = T.KNOWN_LAYOUTS[("turbo3", 32)]
    run = run_checks(NumpyTarget(formats={"turbo3": legacy}), list(all_checks()), ["turbo3"], tmp_path / "ok",
                     log=lambda s: None)
    no_harness_errors(run)
    assert run.verdict == Verdict.PASS
    traits = next(c for c in cells(run) if c.check == "PQ4" and c.path.endswith(":traits"))
    assert "legacy layout: blocks of 32 values" in traits.caveat
    # measured, not waved through: a packing fault in the 14-byte blocks is found
    bad = run_checks(NumpyTarget(faults=["swapped_packing"], formats={"turbo3": legacy}), ["PQ4"], ["turbo3"],
                     tmp_path / "bad", log=lambda s: None)
    no_harness_errors(bad)
    assert bad.verdict == Verdict.FAIL


def test_two_targets_in_one_process_keep_their_own_layouts(tmp_path):
    odd, plain = NumpyTarget(formats={"turbo4": TURBO4_66}), NumpyTarget()
    for i in range(2):  # interleaved: neither target's layouts leak into the other's run
        r1 = run_checks(odd, ["PQ3", "PQ4"], ["turbo4"], tmp_path / f"odd{i}", log=lambda s: None)
        r2 = run_checks(plain, ["PQ3", "PQ4"], ["turbo4"], tmp_path / f"plain{i}", log=lambda s: None)
        assert r1.verdict == Verdict.FAIL and r2.verdict == Verdict.PASS
        no_harness_errors(r1)
    assert T.fmt("turbo4").block_bytes == 68  # nothing global was switched
