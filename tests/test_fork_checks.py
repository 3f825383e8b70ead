"""The checks on the real fork build (skipped, with the reason, when the fork is not built)."""
import numpy as np
import pytest

from harness.checks import pq1_rotation, pq2_codebook, pq3_norms, pq4_layout, pq6_attention
from harness.checks.observations import op_matrices
from harness.errors import ProbeCrash
from harness.reference import turbo as T
from harness.report.model import Verdict, worst

pytestmark = pytest.mark.fork


def test_probe_sees_cpu_and_turbo_types(fork_target):
    assert "cpu" in [b.name for b in fork_target.backends()]
    for t in T.TURBO_TYPES:
        info = fork_target.type_info(t)
        assert info == {"id": info["id"], "block_size": 128, "type_size": T.FORMATS[t].block_bytes}


def test_fork_rotation_is_signed_wht(fork_target, make_ctx):
    ctx = make_ctx(fork_target, types=("turbo3",))
    assert op_matrices(ctx, "cpu")["factor"]["is_signed_wht"]
    assert worst(c.verdict for c in pq1_rotation.run(ctx)) == Verdict.PASS


def test_fork_layout_and_norms_pass(fork_target, make_ctx):
    ctx = make_ctx(fork_target, types=("turbo2", "turbo3", "turbo4"))
    assert worst(c.verdict for c in pq4_layout.run(ctx)) == Verdict.PASS
    assert worst(c.verdict for c in pq3_norms.run(ctx)) == Verdict.PASS


def test_fork_turbo4_codebook_is_not_lloyd_max(fork_target, make_ctx):
    """The fork's 4-bit table has its outer centroid near 1.97 sigma (Lloyd-Max: 2.69): PARTIAL."""
    cells = pq2_codebook.run(make_ctx(fork_target, types=("turbo4",)))
    dist = [c for c in cells if c.metric.startswith("distortion")]
    assert dist and all(c.verdict == Verdict.PARTIAL and c.value > 1.5 for c in dist)


def test_fork_attention_decode_and_prefill(fork_target, make_ctx):
    cells = pq6_attention.run(make_ctx(fork_target, types=("turbo3",)))
    main = [c for c in cells if c.metric == "rel_err"]
    assert any("nq=1" in c.path for c in main) and any("nq=8" in c.path for c in main)
    assert all(c.verdict == Verdict.PASS for c in cells), [c.caveat for c in cells if c.verdict != Verdict.PASS]


def test_real_ggml_abort_becomes_probe_crash_and_worker_restarts(fork_target):
    raw = T.pack("turbo3", np.zeros((1, 128), np.uint8), [1.0]).reshape(-1)
    with pytest.raises(ProbeCrash, match="signal|exit code"):
        fork_target.decode("cpu", "get_rows", "turbo3", raw, 1, 128)  # the CPU get_rows aborts on turbo types
    assert fork_target.decode("cpu", "to_float", "turbo3", raw, 1, 128).shape == (1, 128)
