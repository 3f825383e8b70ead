"""metal-src (the fork's Metal per-block code on the host) and AUDIT (every backend's tables from source).

Each fault is one edit on a COPY of the fork's sources in tmp_path (the real checkout is never touched); the checks
must move off PASS and name what changed. Fixture forks written here (other layouts, no Metal) must give findings or
SKIPs, never an exception.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.checks import audit, compat, pq1_rotation, pq2_codebook
from harness.errors import Unsupported
from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget
from tests.conftest import fork_build_or_skip

FILES = ("ggml/include", "ggml/src/ggml-common.h", "ggml/src/ggml-turbo-quant.c", "ggml/src/ggml-metal/ggml-metal.metal",
         "ggml/src/ggml-metal/ggml-metal-impl.h", "ggml/src/ggml-cuda/turbo-quant.cuh")
METAL = "ggml/src/ggml-metal/ggml-metal.metal"


def _copy(fork: Path, dst: Path) -> Path:
    for rel in FILES:
        src, out = fork / rel, dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out)
    return dst


def _edit(root: Path, table: str, fn) -> None:
    """Apply fn to the initializer text of one Metal table (found by name)."""
    p = root / METAL
    text = p.read_text()
    m = re.search(rf"{table}\s*\[[^\]]*\]\s*=\s*\{{(.*?)\}};", text, re.S)
    assert m, table
    p.write_text(text[:m.start(1)] + fn(m.group(1)) + text[m.end(1):])


@pytest.fixture
def fork_copy(tmp_path, monkeypatch):
    bdir, fork = fork_build_or_skip()
    monkeypatch.setenv("TURBO_HARNESS_CACHE", str(tmp_path.parent / "metal-src-cache"))
    return bdir, _copy(fork, tmp_path / "fork")


def _target(bdir, root):
    from harness.targets.fork import ForkTarget
    return ForkTarget(bdir, root)


def _cells(out, path_part=None, metric=None):
    return [c for c in out if (path_part is None or path_part in c.path) and (metric is None or c.metric == metric)]


@pytest.mark.fork
def test_metal_midpoint_moved_1e6_is_partial_in_audit_and_compat(fork_copy, make_ctx):
    bdir, root = fork_copy
    t = _target(bdir, root)
    try:
        clean = audit.run(make_ctx(t, types=["turbo4"]))
        assert not [c for c in _cells(clean, "metal:source", "threshold_max_abs_diff_vs_target_source")
                    if c.verdict != Verdict.PASS]
    finally:
        t.close()
    _edit(root, "turbo_mid_4bit", lambda s: s.replace(" 0.013963f", " 0.013964f", 1))
    t = _target(bdir, root)
    try:
        ctx = make_ctx(t, types=["turbo4"])
        out = audit.run(ctx)
        bad = [c for c in _cells(out, "metal:source", "threshold_max_abs_diff_vs_target_source") if c.verdict == Verdict.PARTIAL]
        assert bad and "ggml-metal.metal:" in bad[0].caveat and "ggml-turbo-quant.c:" in bad[0].caveat, out
        assert abs(bad[0].value - 1e-6) < 1e-7
        cells = compat._writer_matrix(ctx, "turbo4", {})
        pair = [c for c in cells if "metal-src:set_rows" in c.path and " x " in c.path and "cpu:set_rows" in c.path]
        assert pair and pair[0].verdict == Verdict.PARTIAL, [(c.path, c.verdict, c.caveat) for c in cells]
        assert pair[0].details["threshold_flips"] > 0 and "Metal source on the host CPU" in pair[0].caveat + str(
            [b.description for b in t.backends()])
    finally:
        t.close()


@pytest.mark.fork
def test_metal_first_sign_flipped_fails_pq1_on_metal_src(fork_copy, make_ctx):
    bdir, root = fork_copy
    _edit(root, "turbo_wht_signs1", lambda s: re.sub(r"-?1\.0f", lambda m: "1.0f" if m.group(0).startswith("-") else "-1.0f", s, count=1))
    t = _target(bdir, root)
    try:
        ctx = make_ctx(t, target_backend="metal-src", types=["turbo3"])
        out = pq1_rotation.run(ctx)
        q = _cells(out, "metal-src:set_rows")
        assert q and q[0].verdict == Verdict.FAIL and "sign" in q[0].caveat, [(c.path, c.verdict, c.caveat) for c in out]
        aud = audit.run(make_ctx(t, types=["turbo3"]))
        s = [c for c in _cells(aud, "metal:source", "wht_sign_mismatches_vs_reference") if c.verdict != Verdict.PASS]
        assert s and s[0].value == 1
    finally:
        t.close()


@pytest.mark.fork
def test_unparseable_metal_table_is_skip_never_pass(fork_copy, make_ctx):
    bdir, root = fork_copy
    _edit(root, "turbo_mid_4bit", lambda s: s.replace("-0.145560f", "-TURBO_OUTER_MID", 1))
    t = _target(bdir, root)
    try:
        out = audit.run(make_ctx(t, types=["turbo4"]))
        metal = _cells(out, "metal:source")
        skips = [c for c in metal if c.verdict == Verdict.SKIP and "turbo_mid_4bit" in c.caveat]
        assert skips, [(c.metric, c.verdict, c.caveat) for c in metal]
        assert not [c for c in metal if c.type == "turbo4" and "threshold" in c.metric and c.verdict == Verdict.PASS]
        with pytest.raises(Unsupported, match="does not compile"):  # the shim cannot build it: metal-src cells SKIP
            t.quantize("metal-src", "set_rows", "turbo4", np.ones((1, 128), np.float32))
    finally:
        t.close()


@pytest.mark.fork
def test_fp16_lut_rounded_to_8_bits_is_flagged(fork_copy, make_ctx):
    bdir, root = fork_copy

    def round8(s):
        def r(m):
            v = float(m.group(1))
            e = np.floor(np.log2(abs(v))) if v else 0
            return f"{np.round(v / 2 ** (e - 7)) * 2 ** (e - 7):.9f}h"
        return re.sub(r"(-?\d+\.\d+)h", r, s)
    _edit(root, "turbo_centroids_4bit_h", round8)
    t = _target(bdir, root)
    try:
        ctx = make_ctx(t, types=["turbo4"])
        out = audit.run(ctx)
        f16 = [c for c in _cells(out, "metal:source", "fp16_copy_ulps_from_correct_rounding")
               if c.details["table"] == "turbo_centroids_4bit_h"]
        assert f16 and f16[0].verdict == Verdict.PARTIAL and f16[0].value > 0
        cells = pq2_codebook._table_cells(ctx, "turbo4", [])
        t4 = _cells(cells, "metal-src:dequant_t4", "table_rel_diff_vs_reference_path")
        assert t4 and t4[0].verdict == Verdict.PARTIAL, [(c.path, c.metric, c.verdict, c.value) for c in cells]
    finally:
        t.close()


# ----------------------------------------------------------------------------- fixture forks (no build needed)

COMMON_OTHER = """
#define QK_TURBO2 32
#define QK_TURBO3 32
#define QK_TURBO4 128
typedef struct { ggml_half norm; uint8_t qs[QK_TURBO2 / 4]; } block_turbo2_0;
typedef struct { ggml_half norm; uint8_t qs[QK_TURBO3 / 4]; uint8_t signs[QK_TURBO3 / 8]; } block_turbo3_0;
typedef struct { ggml_half norm; uint8_t qs[QK_TURBO4 / 2]; } block_turbo4_0;
"""


def _fixture_fork(root: Path, metal: str | None, centroids4) -> Path:
    (root / "ggml/src/ggml-metal").mkdir(parents=True)
    (root / "ggml/src/ggml-common.h").write_text(COMMON_OTHER)
    c = ", ".join(f"{v:.6f}f" for v in centroids4)
    mids = ", ".join(f"{v:.6f}f" for v in 0.5 * (centroids4[1:] + centroids4[:-1]))
    (root / "ggml/src/ggml-turbo-quant.c").write_text(
        f"static const float CENTROIDS_4BIT[16] = {{ {c} }};\nstatic const float MID_4BIT[15] = {{ {mids} }};\n")
    if metal is not None:
        (root / METAL).write_text(metal)
    return root


def test_other_layouts_and_no_metal_give_findings_or_skips(tmp_path, make_ctx, monkeypatch):
    from harness.reference.lloydmax import lloyd_max
    from harness.targets.metal_src import MetalSrcRoutes
    monkeypatch.setenv("TURBO_HARNESS_CACHE", str(tmp_path / "cache"))
    c4 = lloyd_max(4, "beta", 128).centroids
    metal = ("constant float turbo_centroids_4bit[16] = { " + ", ".join(f"{v:.6f}f" for v in c4) + " };\n"
             "constant half turbo_centroids_4bit_h[16] = { " + ", ".join(f"{v:.6f}h" for v in c4) + " };\n")
    for name, m in (("other-layouts", metal), ("no-metal", None)):
        root = _fixture_fork(tmp_path / name, m, c4)
        target = NumpyTarget()
        target.fork = root
        out = audit.run(make_ctx(target, types=["turbo2", "turbo3", "turbo4"]))
        assert out and all(c.verdict in (Verdict.PASS, Verdict.PARTIAL, Verdict.FAIL, Verdict.SKIP) for c in out)
        structs = _cells(out, "common:source", "block_bytes_vs_traits")
        assert structs and {c.verdict for c in structs} == {Verdict.FAIL}, [(c.type, c.value, c.caveat) for c in structs]
        assert {c.type for c in structs} == {"turbo2", "turbo3", "turbo4"}
        assert any("66" in c.caveat for c in structs) and any("14" in c.caveat for c in structs)
        assert [c for c in out if c.verdict == Verdict.SKIP], "tables absent from a backend are SKIP, never PASS"
        routes = MetalSrcRoutes(root)
        assert MetalSrcRoutes.available(root) == (m is not None)
        with pytest.raises(Unsupported):
            routes.quantize("set_rows", "turbo4", np.ones((1, 128), np.float32))


@pytest.mark.fork
def test_a_named_table_that_no_longer_reads_as_a_codebook_is_skip_not_dropped(fork_copy, make_ctx):
    """CPU's dequantiser has its own CENTROIDS_4BIT (the second copy in ggml-turbo-quant.c). Two of its values
    swapped: the table is no longer ascending, so it is not classified as centroids; it was dropped without a word and
    the first copy (the quantiser's) made every cpu turbo4 centroid cell PASS. It must be a SKIP naming the table."""
    bdir, root = fork_copy
    p = root / "ggml/src/ggml-turbo-quant.c"
    text = p.read_text()
    starts = [m.start() for m in re.finditer(r"CENTROIDS_4BIT\s*\[16\]\s*=\s*\{", text)]
    assert len(starts) >= 2
    head, tail = text[:starts[1]], text[starts[1]:]
    tail = tail.replace("0.117195f,  0.173926f", "0.173926f,  0.117195f", 1)
    assert tail != text[starts[1]:]
    p.write_text(head + tail)
    t = _target(bdir, root)
    try:
        out = audit.run(make_ctx(t, types=["turbo4"]))
        cpu = _cells(out, "cpu:source")
        skips = [c for c in cpu if c.verdict == Verdict.SKIP and "CENTROIDS_4BIT" in c.caveat and c.type == "turbo4"]
        assert skips, [(c.metric, c.verdict.value, c.caveat) for c in cpu]
        assert "ggml-turbo-quant.c" in skips[0].caveat
    finally:
        t.close()


@pytest.mark.fork
def test_target_backend_with_no_table_found_is_skip(fork_copy, make_ctx):
    """The target backend's own tables not found (here ggml-turbo-quant.c absent from the copy): AUDIT judged the
    other backends against each other and said nothing of the target's; the target gets a SKIP per missing table."""
    bdir, root = fork_copy
    (root / "ggml/src/ggml-turbo-quant.c").unlink()
    t = _target(bdir, root)
    try:
        out = audit.run(make_ctx(t, types=["turbo4"]))
        cpu = [c for c in _cells(out, "cpu:source") if c.type == "turbo4"]
        assert {c.verdict for c in cpu} == {Verdict.SKIP}, [(c.metric, c.verdict.value, c.caveat) for c in cpu]
        assert any("centroids table found in cpu" in c.caveat for c in cpu)
        assert all(c.target for c in cpu)
    finally:
        t.close()


@pytest.mark.fork
def test_every_sign_pair_of_a_file_is_audited(fork_copy, make_ctx):
    """Vulkan's copy_to_quant.comp holds three (s1, s2) pairs, one per type (TS1/TS2, TS1_T2/TS2_T2, TS1_T4/TS2_T4).
    Only the first pair of a file was compared: one sign flipped in TS1_T4 (Vulkan's turbo4 writer) gave no cell at
    all. Every pair is judged; the flip is a finding naming TS1_T4."""
    bdir, root = fork_copy
    rel = "ggml/src/ggml-vulkan/vulkan-shaders/copy_to_quant.comp"
    src = (fork_build_or_skip()[1] / rel).read_text()
    m = re.search(r"TS1_T4\s*\[128\]\s*=\s*float\[128\]\(\s*(-?1)", src)
    assert m, "TS1_T4 not in the fork's Vulkan copy_to_quant.comp"
    flipped = src[:m.start(1)] + ("1" if m.group(1) == "-1" else "-1") + src[m.end(1):]
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(flipped)
    t = _target(bdir, root)
    try:
        out = audit.run(make_ctx(t, types=["turbo4"]))
        vk = _cells(out, "vulkan:source", "wht_sign_mismatches_vs_reference")
        names = {c.details.get("table"): c for c in vk}
        assert {"TS1", "TS1_T2", "TS1_T4"} <= set(names), sorted(names)
        assert names["TS1_T4"].verdict in (Verdict.PARTIAL, Verdict.FAIL) and names["TS1_T4"].value == 1
        assert names["TS1"].verdict == Verdict.PASS
    finally:
        t.close()


def test_an_fp16_copy_with_no_f32_table_is_skip_not_a_note(make_ctx):
    """A backend whose turbo3 codebook is only written in half precision (no f32 table of the type anywhere): the copy
    cannot be compared with anything; that was a note only, so the type's audit showed no cell for it. It is SKIP."""
    from harness.fork.source_audit import SrcTable
    c = np.linspace(-0.2, 0.2, 8)
    tab = SrcTable("metal", "ggml/src/ggml-metal/ggml-metal.metal", 10, "turbo_centroids_3bit_h", "centroids", bits=3,
                   precision="f16", values=c.astype(np.float16).astype(np.float64), lines=list(range(10, 18)))
    au = audit._Audit(make_ctx(NumpyTarget(), types=["turbo3"]), [tab])
    au.half_copies()
    assert [(x.verdict, x.type, x.path) for x in au.cells] == [(Verdict.SKIP, "turbo3", "metal:source")], au.cells
    assert "no f32 table" in au.cells[0].caveat


def test_misshapen_tables_are_unparsed_but_other_codebooks_are_not():
    """A turbo-named table of a turbo table's size that does not classify is 'unparsed' (SKIP); a 1-bit codebook
    (CENTROIDS_1BIT, two values, in forks with QJL) is not a turbo type's table and is not flagged."""
    from harness.fork.source_audit import _misshapen
    c4 = np.linspace(-0.17, 0.17, 16)
    c4[[14, 15]] = c4[[15, 14]]
    t = _misshapen("cpu", "ggml/src/ggml-turbo-quant.c", 578, "CENTROIDS_4BIT", [(v, 578, "") for v in c4])
    assert t is not None and t.kind == "unparsed" and t.bits == 4
    assert _misshapen("cpu", "x.c", 27, "CENTROIDS_1BIT", [(-0.07, 27, ""), (0.07, 27, "")]) is None
