"""A backend that writes a type it cannot read (Vulkan's turbo2/turbo4 on fork 69d8e4be4) is judged by PQ1, PQ3, PQ4
and PQ5 through another backend's exact decoder (spec "Every backend, and how it was examined"; issue 19), and a fault
in that writer moves the matching check to FAIL on the writer's path. A NumPy target emulates it: its 'vulkan' backend
writes turbo2/turbo4 but raises Unsupported when asked to decode them."""
from __future__ import annotations

import numpy as np
import pytest

from harness.checks import examined, pq1_rotation, pq3_norms, pq4_layout, pq5_distortion
from harness.errors import Unsupported
from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks

LAVAPIPE = "llvmpipe (LLVM 15.0.6, 256 bits)"
SOFT_NOTE = "Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic"
CHECKS = {"PQ1": pq1_rotation, "PQ3": pq3_norms, "PQ4": pq4_layout, "PQ5": pq5_distortion}
TYPES = ("turbo2", "turbo4")


def _target(vk_faults=(), unreadable=None, cls=NumpyTarget):
    return cls(backends=(("cpu", "cpu"), ("vulkan", "gpu")), devices={"vulkan": LAVAPIPE},
               unreadable=unreadable or {"vulkan": {"turbo2", "turbo4"}}, backend_faults={"vulkan": set(vk_faults)})


def _writer_cells(make_ctx, check, target, types=TYPES, path="vulkan:set_rows"):
    cells = CHECKS[check].run(make_ctx(target, target_backend="vulkan", types=types))
    got = {c.type: c for c in cells if c.path == path}
    assert set(got) == set(types), [(c.type, c.path, c.verdict) for c in cells]
    return got, cells


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_a_writer_only_backend_gets_judged_cells_that_name_the_reader(make_ctx, check):
    got, cells = _writer_cells(make_ctx, check, _target())
    for t, c in got.items():
        assert c.verdict == Verdict.PASS, (t, c.caveat)
        assert f"vulkan writes {t} but cannot read it: decoded by cpu:to_float" in c.caveat
        assert c.details["reader"] == "cpu:to_float" and c.value is not None
    if check == "PQ5":  # the writer has the rotation op: the un-rotation ran there
        assert all("un-rotated by vulkan:turbo_wht" in c.caveat for c in got.values())
    if check == "PQ4":  # Vulkan's own decode of the types it cannot read stays SKIP, with the reason
        dec = [c for c in cells if c.path == "vulkan:decode"]
        assert len(dec) == 2 and all(c.verdict == Verdict.SKIP and "cannot read" in c.caveat for c in dec)
    # the CPU's own cells read their own bytes and say nothing about another reader
    assert all("cannot read" not in c.caveat and "reader" not in c.details for c in cells if c.path.startswith("cpu:"))


def _fails_on_the_writer(got):
    for t, c in got.items():
        assert c.verdict == Verdict.FAIL and c.target and c.path == "vulkan:set_rows", (t, c.verdict, c.caveat)
        assert "vulkan writes" in c.caveat


def test_a_wrong_norm_in_the_writer_fails_pq3(make_ctx):
    got, cells = _writer_cells(make_ctx, "PQ3", _target({"uncorrected_norm"}))
    _fails_on_the_writer(got)
    assert all("uncorrected norm" in c.caveat for c in got.values())
    assert all(c.verdict == Verdict.PASS for c in cells if c.path.startswith("cpu:"))


def test_a_wrong_packing_in_the_writer_fails_pq4_with_the_rearrangement(make_ctx):
    got, cells = _writer_cells(make_ctx, "PQ4", _target({"swapped_packing"}))
    _fails_on_the_writer(got)
    for t, c in got.items():
        assert c.details["arrangement"] == "positions permuted" and "other positions" in c.caveat
        per_byte = 2 if t == "turbo4" else 4  # the fault reverses the indices inside each byte
        pi = c.details["permutation"]
        assert pi[:per_byte] == list(range(per_byte))[::-1]
    assert all(c.verdict == Verdict.PASS for c in cells if c.path.startswith("cpu:"))


def test_a_wrong_rotation_in_the_writer_fails_pq1_and_pq5_but_not_pq4(make_ctx):
    tgt = _target({"quantizer_signs"})
    got1, _ = _writer_cells(make_ctx, "PQ1", tgt)
    _fails_on_the_writer(got1)
    assert all("sign vectors differ" in c.caveat for c in got1.values())
    got5, _ = _writer_cells(make_ctx, "PQ5", _target({"quantizer_signs"}))
    _fails_on_the_writer(got5)
    got4, _ = _writer_cells(make_ctx, "PQ4", _target({"quantizer_signs"}))  # the layout itself is right
    assert all(c.verdict == Verdict.PASS and c.details["arrangement"] == "quantizer rotation" for c in got4.values())


def test_a_wrong_centroid_in_the_writer_fails_pq5_and_pq3(make_ctx):
    got5, _ = _writer_cells(make_ctx, "PQ5", _target({"perturbed_centroids"}), types=("turbo4",))
    _fails_on_the_writer(got5)
    assert "above TurboQuant's bound" in got5["turbo4"].caveat
    got3, _ = _writer_cells(make_ctx, "PQ3", _target({"perturbed_centroids"}))
    _fails_on_the_writer(got3)
    got1, _ = _writer_cells(make_ctx, "PQ1", _target({"perturbed_centroids"}))
    _fails_on_the_writer(got1)


def test_without_the_writer_only_path_the_same_faults_stay_on_the_cpu_cells(make_ctx):
    # the same fault on the CPU instead: the Vulkan writer's cells pass, the CPU's fail (PARTIAL: not the target)
    tgt = NumpyTarget(backends=(("cpu", "cpu"), ("vulkan", "gpu")), devices={"vulkan": LAVAPIPE},
                      unreadable={"vulkan": {"turbo4"}}, backend_faults={"cpu": {"uncorrected_norm"}})
    cells = pq3_norms.run(make_ctx(tgt, target_backend="vulkan", types=("turbo4",)))
    by = {c.path: c for c in cells}
    assert by["vulkan:set_rows"].verdict == Verdict.PASS
    assert by["cpu:set_rows"].verdict == Verdict.PARTIAL


def test_no_reader_at_all_stays_skip_with_the_reason(make_ctx):
    tgt = _target(unreadable={"vulkan": {"turbo4"}, "cpu": {"turbo4"}})
    for check in CHECKS:
        got, _ = _writer_cells(make_ctx, check, tgt, types=("turbo4",))
        c = got["turbo4"]
        assert c.verdict == Verdict.SKIP and "no decode route for turbo4 on vulkan" in c.caveat, (check, c.caveat)


class _NoVulkanWht(NumpyTarget):
    def wht(self, backend, x, direction, group=128):
        if backend == "vulkan":
            raise Unsupported("device Vulkan0 does not support TURBO_WHT (emulated)")
        return super().wht(backend, x, direction, group)


def test_the_un_rotation_runs_on_the_reader_when_the_writer_has_no_op(make_ctx):
    got, _ = _writer_cells(make_ctx, "PQ5", _target(cls=_NoVulkanWht), types=("turbo4",))
    c = got["turbo4"]
    assert c.verdict == Verdict.PASS and c.details["unrotated_by"] == "cpu:turbo_wht"
    assert "un-rotated by cpu:turbo_wht" in c.caveat


def test_the_examination_counts_the_write_on_the_writer_and_the_decode_on_the_reader(tmp_path):
    run = run_checks(_target(), ["PQ3"], ["turbo4"], tmp_path / "r", target_backend="vulkan", log=lambda s: None)
    cells = run.checks[0].cells
    seen = examined.measured({"PQ3": cells})
    assert seen[("vulkan", "turbo4", "quantize")]["routes"] == {"set_rows"}
    assert seen[("cpu", "turbo4", "decode")]["routes"] == {"to_float"}
    assert ("vulkan", "turbo4", "decode") not in seen  # Vulkan decoded nothing of turbo4
    vk = next(c for c in cells if c.path == "vulkan:set_rows")
    assert SOFT_NOTE in vk.caveat


def test_a_software_reader_of_another_writer_puts_its_mode_on_the_cell(tmp_path):
    # reversed roles: the CPU writes turbo4 but cannot read it, Vulkan on lavapipe reads it: the CPU writer's cell was
    # decoded on the software device, and says so
    tgt = NumpyTarget(backends=(("cpu", "cpu"), ("vulkan", "gpu")), devices={"vulkan": LAVAPIPE},
                      unreadable={"cpu": {"turbo4"}})
    run = run_checks(tgt, ["PQ3"], ["turbo4"], tmp_path / "r", target_backend="cpu", log=lambda s: None)
    c = next(c for c in run.checks[0].cells if c.path == "cpu:set_rows")
    assert c.verdict == Verdict.PASS and c.details["reader"] == "vulkan:get_rows"
    assert SOFT_NOTE in c.caveat and c.details["examined"] == {"vulkan": SOFT_NOTE}


class _RelabelledVulkan(NumpyTarget):
    """Vulkan's turbo4 writer stores each 4-bit index with its bits reversed (a layout fault no own reader hides)."""

    def quantize(self, backend, route, type_name, x):
        raw = super().quantize(backend, route, type_name, x)
        if backend != "vulkan" or type_name != "turbo4":
            return raw
        from harness.reference import turbo as T
        idx, norms, reserved = T.unpack(type_name, raw)
        rev = np.array([int(f"{k:04b}"[::-1], 2) for k in range(16)], np.uint8)
        return T.pack(type_name, rev[idx], norms, reserved).reshape(-1)


def test_relabelled_index_values_in_the_writer_fail_pq4(make_ctx):
    got, _ = _writer_cells(make_ctx, "PQ4", _target(cls=_RelabelledVulkan), types=("turbo4",))
    _fails_on_the_writer(got)
    c = got["turbo4"]
    assert c.details["arrangement"] == "values relabelled" and c.details["relabelling"][1] == 8
    assert "bit order inside an index" in c.caveat


def test_the_rearrangement_finders_find_only_rearrangements():
    rng = np.random.default_rng(3)
    e = rng.integers(0, 16, (256, 128))
    pi = rng.permutation(128)
    s = np.empty_like(e)
    s[:, pi] = e  # stored[:, pi[i]] = expected[:, i]
    assert np.array_equal(pq4_layout.position_permutation(s, e), pi)
    assert pq4_layout.position_permutation(e, e) is None  # the identity is the reference layout
    other = rng.integers(0, 16, (256, 128))  # indices of another rotation: no position matches
    assert pq4_layout.position_permutation(other, e) is None
    g = rng.permutation(16)
    assert np.array_equal(pq4_layout.value_relabelling(g[e], e, 16), g)
    assert pq4_layout.value_relabelling(e, e, 16) is None and pq4_layout.value_relabelling(other, e, 16) is None
    near = e.copy()
    near[rng.random(e.shape) < 0.05] += 1  # 5% neighbours: not a rearrangement
    assert pq4_layout.position_permutation(np.clip(near, 0, 15), e) is None
