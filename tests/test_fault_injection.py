"""Every check passes a correct NumPy fork and leaves PASS when its fault is injected.

The checks and the fault -> check table come from the registry (each check's ``catches``), not from this file."""
import pytest

from harness.checks import pq1_rotation, pq2_codebook, pq3_norms, pq6_attention
from harness.checks.registry import REGISTRY
from harness.report.model import Verdict, worst
from harness.targets.numpy_target import KNOWN_FAULTS, NumpyTarget

# the checks that judge ggml alone (the others, in_verify=False or needing the fork's binaries, are tested elsewhere)
CHECKS = {c.id: c for c in REGISTRY if c.needs == ("probe",)}
FAULT_TABLE = [(f, c.id, {Verdict(v) for v in vs}) for c in CHECKS.values() for f, vs in c.catches.items()]


def verdicts(ctx, ids=CHECKS):
    return {i: worst(c.verdict for c in CHECKS[i].evaluate(ctx)) for i in ids}


def test_the_registry_names_a_catching_check_for_every_fault():
    assert set(CHECKS) >= {"PQ1", "PQ2", "PQ3", "PQ4", "PQ5", "PQ6"}
    caught = {f for f, _, _ in FAULT_TABLE}
    # the two tie/threshold-shift faults are COMPAT's (tests/test_paths_against_each_other.py): tiny by design
    assert caught == KNOWN_FAULTS - {"thresholds_shift_1e-6", "boundary_ties"}, sorted(KNOWN_FAULTS ^ caught)
    assert len(FAULT_TABLE) == 15


def test_correct_target_passes_everything(make_ctx):
    v = verdicts(make_ctx(NumpyTarget(), types=("turbo2", "turbo3", "turbo4")))
    assert v == {i: Verdict.PASS for i in CHECKS}, v


@pytest.mark.parametrize("fault,check,expected", FAULT_TABLE)
def test_fault_moves_matching_check_off_pass(make_ctx, fault, check, expected):
    types = ("turbo4",) if fault == "reserved_nonzero" else ("turbo3", "turbo4")
    ctx = make_ctx(NumpyTarget(faults=[fault]), types=types)
    got = verdicts(ctx, [check])[check]
    assert got in expected, f"{fault}: {check} gave {got}"


def test_uncorrected_norm_caveat_names_shrinkage(make_ctx):
    cells = pq3_norms.run(make_ctx(NumpyTarget(faults=["uncorrected_norm"]), types=("turbo2",)))
    assert any("uncorrected" in c.caveat for c in cells if c.verdict == Verdict.FAIL)


def test_perturbed_centroids_reports_outer_centroid_in_sigma(make_ctx):
    cells = pq2_codebook.run(make_ctx(NumpyTarget(faults=["perturbed_centroids"]), types=("turbo4",)))
    part = [c for c in cells if c.metric.startswith("distortion") and c.verdict == Verdict.PARTIAL]
    assert part and "sigma" in part[0].caveat
    assert part[0].details["outer_centroid_sigma"] < part[0].details["lloyd_max_outer_sigma"]


def test_quantizer_sign_fault_is_named(make_ctx):
    cells = pq1_rotation.run(make_ctx(NumpyTarget(faults=["quantizer_signs"]), types=("turbo3",)))
    bad = [c for c in cells if c.verdict == Verdict.FAIL]
    assert bad and all(c.path == "cpu:set_rows" or c.path == "cpu:quantize_chunk" or "cpu" in c.path for c in bad)
    assert any("sign" in c.caveat for c in bad)


def test_fault_only_on_fallback_backend_is_partial_when_gpu_is_target(make_ctx):
    backends = (("cpu", "cpu"), ("gpu0", "gpu"))
    tgt = NumpyTarget(backends=backends, backend_faults={"cpu": {"quantizer_signs"}})
    gpu_target = worst(c.verdict for c in pq1_rotation.run(make_ctx(tgt, target_backend="gpu0", types=("turbo3",))))
    assert gpu_target == Verdict.PARTIAL
    tgt = NumpyTarget(backends=backends, backend_faults={"cpu": {"quantizer_signs"}})
    cells = pq1_rotation.run(make_ctx(tgt, target_backend="cpu", types=("turbo3",)))
    assert worst(c.verdict for c in cells) == Verdict.FAIL
    assert any("cpu:set_rows" == c.path and c.verdict == Verdict.FAIL for c in cells)


def test_ablations_are_large_on_correct_target(make_ctx):
    cells = pq6_attention.run(make_ctx(NumpyTarget(), types=("turbo3",)))
    abl = [c for c in cells if c.metric.startswith("ablation")]
    assert len(abl) == 2 and all(c.value > 0.5 for c in abl)
    main = [c for c in cells if c.metric == "rel_err"]
    assert main and max(c.value for c in main) < 1e-4


def test_unrotated_decode_is_seen_by_the_constant_block_spread(make_ctx):
    cells = pq2_codebook.run(make_ctx(NumpyTarget(faults=["decode_unrotated"]), types=("turbo3",)))
    spread = [c for c in cells if c.metric == "constant_block_rel_spread"]
    assert spread and all(c.verdict == Verdict.FAIL and c.value > 0.5 for c in spread)


def test_a_writer_leaving_most_of_each_block_unwritten_passes_pq4_and_fails_pq5(make_ctx):
    """CUDA's turbo3/turbo2 set_rows at b9df4c3d (catalogue cuda-turbo-set-rows-block128) wrote only the first 32
    values of each 128-value block: well-formed bytes that its own decode and the reference unpacker read alike, so
    PQ4 (layout: a path's bytes against its own decode) cannot see it; PQ5 (the decoded values against the input) and
    PQ1 (the indices against the reference quantiser) do, on the target path."""
    ctx = make_ctx(NumpyTarget(backends=(("cpu", "cpu"), ("cuda", "gpu")), backend_faults={"cuda": {"partial_block_write"}}),
                   types=("turbo3", "turbo2"), target_backend="cuda")
    v = verdicts(ctx, ["PQ1", "PQ4", "PQ5"])
    assert v["PQ4"] == Verdict.PASS and v["PQ5"] == Verdict.FAIL and v["PQ1"] == Verdict.FAIL, v
    bad = [c for c in CHECKS["PQ5"].evaluate(ctx) if c.verdict == Verdict.FAIL]
    assert bad and all(c.path == "cuda:set_rows" for c in bad) and "above TurboQuant's bound" in bad[0].caveat
