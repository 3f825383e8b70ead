"""Cross-backend rules: target vs fallback verdicts, fake backend lists (Metal), crashes, real CUDA evidence."""
from pathlib import Path

import numpy as np
import pytest

from harness.checks import compat, pq1_rotation
from harness.checks.observations import decode_tolerance
from harness.reference import turbo as T
from harness.report.model import Verdict, worst
from harness.runners import backend_ops
from harness.targets.fork import select_backends
from harness.targets.numpy_target import NumpyTarget
from harness.verify import pick_target_backend, run_checks

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "reports" / "samples" / "cuda-h200"
FIX = ROOT / "tests" / "fixtures" / "backend_ops"


def two_backends(**kw):
    return NumpyTarget(backends=(("cpu", "cpu"), ("cuda", "gpu")), **kw)


def test_fallback_rotation_partial_with_gpu_target_fail_with_cpu_target(make_ctx):
    faults = {"cpu": {"quantizer_signs"}}
    for check in (pq1_rotation, compat):
        gpu = check.run(make_ctx(two_backends(backend_faults=faults), target_backend="cuda", types=("turbo3",)))
        cpu = check.run(make_ctx(two_backends(backend_faults=faults), target_backend="cpu", types=("turbo3",)))
        assert worst(c.verdict for c in gpu) == Verdict.PARTIAL, check.ID
        assert any("cpu:set_rows" in c.caveat and c.verdict == Verdict.PARTIAL for c in gpu), check.ID
        assert worst(c.verdict for c in cpu) == Verdict.FAIL, check.ID


def test_clean_two_backend_matrix_passes(make_ctx):
    cells = compat.run(make_ctx(two_backends(), target_backend="cuda", types=("turbo3",)))
    assert worst(c.verdict for c in cells) == Verdict.PASS
    cross = [c for c in cells if c.metric == "cross_decode_rel_err"]
    assert {c.details["writer"] for c in cross} == {"cpu:set_rows", "cpu:quantize_chunk", "cuda:set_rows"}
    assert {c.details["reader"] for c in cross} == {"cpu", "cuda"}


def test_metal_from_registry_is_a_gpu_target_on_the_same_code_path(make_ctx):
    devices = [{"name": "MTL0", "description": "Apple M3", "reg": "Metal", "kind": "gpu"},
               {"name": "BLAS", "description": "Accelerate", "reg": "BLAS", "kind": "accel"},
               {"name": "CPU", "description": "Apple M3", "reg": "CPU", "kind": "cpu"}]
    bs = select_backends(devices)
    assert [(b.name, b.kind) for b in bs] == [("metal", "gpu"), ("cpu", "cpu")]
    tgt = NumpyTarget(backends=[(b.name, b.kind) for b in bs])
    assert pick_target_backend(tgt, None) == "metal"
    run = run_checks(tgt, ["PQ1"], ["turbo3"], make_ctx(tgt).evidence_dir.parent / "r", log=lambda s: None)
    assert run.meta["target_backend"] == "metal"
    assert "cuda" in run.meta["backends_not_available"] and "metal" not in run.meta["backends_not_available"]
    assert any(c.path.startswith("metal:") and c.target for c in run.checks[0].cells)


def test_backend_abort_is_a_fail_cell_and_the_run_goes_on(make_ctx, tmp_path):
    # an abort on an op the backend accepted is the fork's fault: FAIL quoting the abort (spec "Who is at fault")
    tgt = two_backends(backend_faults={"cuda": {"crash_attention"}})
    run = run_checks(tgt, ["PQ6", "COMPAT"], ["turbo3"], tmp_path / "r", target_backend="cuda", log=lambda s: None)
    pq6 = run.checks[0]
    crashed = [c for c in pq6.cells if c.path.startswith("cuda:")]
    assert crashed and all(c.verdict == Verdict.FAIL and "emulated ggml abort" in c.caveat for c in crashed)
    assert any(c.verdict == Verdict.PASS and c.path.startswith("cpu:") for c in pq6.cells)
    assert not any(c.verdict == Verdict.ERROR for ch in run.checks for c in ch.cells)
    assert run.checks[1].id == "COMPAT" and run.checks[1].cells
    assert run.exit_code() == 1


def test_coverage_table_lists_every_combination(make_ctx):
    ctx = make_ctx(two_backends(), target_backend="cuda", types=("turbo4",))
    rows = compat.coverage(ctx)
    assert len(rows) == 2 * (3 + 2 * 2 * 3)  # backends x (K+V sym x 3 dims + 2 roles x 2 partners x 3 dims)
    assert {r["head_dim"] for r in rows} == {64, 128, 256} and {r["partner"] for r in rows} == {"turbo4", "q8_0", "f16"}
    # 'tested' only where PQ6 judges the accuracy of that combination; the others are smoke runs and say so
    judged = [r for r in rows if r["status"].startswith("tested")]
    assert {(r["pair"], r["head_dim"]) for r in judged} == {("turbo4/turbo4", 64), ("turbo4/turbo4", 128),
                                                             ("turbo4/turbo4", 256), ("turbo4/q8_0", 128),
                                                             ("q8_0/turbo4", 128)}
    assert all(r["status"].startswith("runs, not judged") for r in rows if r not in judged)
    assert not [r for r in rows if r["partner"] == "f16" and r["status"].startswith("tested")]


def test_backend_ops_parser_on_real_cuda_output():
    res = backend_ops.parse((FIX / "cuda_h200_excerpt.log").read_text())
    assert res and all(r.backend == "CUDA0" for r in res)
    assert {r.op for r in res} == {"TURBO_WHT", "FLASH_ATTN_EXT"}
    assert all(r.status == "OK" for r in res)
    assert any("type_KV=turbo3" in r.params for r in res)


def test_backend_ops_parser_keeps_error_values():
    text = ("Backend 1/2: CUDA0\n  FLASH_ATTN_EXT(hsk=128,type_KV=turbo3): [FLASH_ATTN_EXT] NMSE = 0.012345678 > 0.000500000 "
            "\x1b[1;31mFAIL\x1b[0m\n  SET_ROWS(type=turbo4,ne=[128,5]): not supported [CUDA0]\n")
    r = backend_ops.parse(text)
    assert r[0].status == "FAIL" and r[0].error == pytest.approx(0.012345678) and r[0].max_error == pytest.approx(5e-4)
    assert r[1].status == "not supported"


def test_backend_ops_crash_log_parses_what_came_before():
    text = (FIX / "cuda_h200_abort_tq3_1s.log").read_text()
    assert "unsupported src0 type: tq3_1s" in text
    res = backend_ops.parse(text)
    assert {r.status for r in res} == {"OK", "not supported"} and res[-1].params.startswith("type=iq4_xs")


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="CUDA sample report not present")
def test_real_cuda_fa_decode_within_declared_precision_and_packing_faults_are_not():
    for t in T.TURBO_TYPES:
        d = np.load(SAMPLE / "evidence" / "PQ4" / f"{t}_cuda_fa_decode_refpack.npz")
        got, ref = d["decoded"].astype(np.float64), d["reference"].astype(np.float64)
        assert np.all(np.abs(got - ref) <= decode_tolerance("fa_decode", ref)), t
        swapped = ref.reshape(ref.shape[0], -1, 2)[..., ::-1].reshape(ref.shape)  # neighbours exchanged
        assert np.count_nonzero(np.abs(swapped - ref) > decode_tolerance("fa_decode", ref)) > ref.size // 2
        cuda = np.load(SAMPLE / "evidence" / "PQ2" / f"{t}_cuda_fa_decode_table.npz")["table"]
        cpu = np.load(SAMPLE / "evidence" / "PQ2" / f"{t}_cpu_to_float_table.npz")["table"]
        assert np.all(np.abs(cuda - cpu) <= decode_tolerance("fa_decode", cpu)), t
