"""Vulkan on a software device (Mesa's lavapipe): device visibility, examination mode, work sized for it, writers
judged by other readers, test-backend-ops time limits, and the headers a build needs (issue 19)."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.checks import compat, pq6_attention
from harness.checks.compat_tables import backend_ops_cells
from harness.fork import backends, vulkan
from harness.fork import build as fb
from harness.errors import Unsupported
from harness.report.model import Verdict
from harness.runners import backend_ops
from harness.targets.fork import select_backends
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks

LAVAPIPE = "llvmpipe (LLVM 15.0.6, 256 bits)"
SUMMARY = f"""==========
VULKANINFO
==========

Vulkan Instance Version: 1.3.239

Devices:
========
GPU0:
\tapiVersion         = 1.3.230
\tdriverVersion      = 0.0.1
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = {LAVAPIPE}
\tdriverID           = DRIVER_ID_MESA_LLVMPIPE
\tdriverName         = llvmpipe
\tdriverInfo         = Mesa 22.3.6 (LLVM 15.0.6)
"""
GPU = {"index": 0, "type": "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "name": "NVIDIA H100", "driver_name": "NVIDIA",
       "driver_info": "550", "api": "1.3"}
SOFT = {"index": 1, "type": vulkan.SOFTWARE_TYPE, "name": LAVAPIPE, "driver_name": "llvmpipe",
        "driver_info": "Mesa 22.3.6", "api": "1.3.230"}


def _exe(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# ----------------------------------------------------------------------------- devices and GGML_VK_VISIBLE_DEVICES

def test_fake_vulkaninfo_is_parsed_and_a_software_only_machine_gets_its_device_named(tmp_path):
    _exe(tmp_path / "vulkaninfo", f"import sys\nprint({SUMMARY!r})\n")
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env.pop(vulkan.VISIBLE_ENV, None)
    devs = vulkan.list_devices(env)
    assert devs == [{"index": 0, "type": vulkan.SOFTWARE_TYPE, "name": LAVAPIPE, "driver_name": "llvmpipe",
                     "driver_info": "Mesa 22.3.6 (LLVM 15.0.6)", "api": "1.3.230"}]
    out, note = vulkan.device_env(env, devs)
    assert out[vulkan.VISIBLE_ENV] == "0" and "set by the harness" in note and vulkan.VISIBLE_ENV not in env
    assert "Mesa 22.3.6" in vulkan.driver_line(devs) and "software" in vulkan.driver_line(devs)


def test_visible_devices_left_alone_with_a_gpu_or_when_the_user_set_it():
    base = {k: v for k, v in os.environ.items() if k != vulkan.VISIBLE_ENV}
    assert vulkan.VISIBLE_ENV not in vulkan.device_env(base, [GPU, SOFT])[0]  # ggml's default: the GPUs
    assert vulkan.device_env(dict(base, **{vulkan.VISIBLE_ENV: "1"}), [SOFT])[0][vulkan.VISIBLE_ENV] == "1"
    assert vulkan.VISIBLE_ENV not in vulkan.device_env(base, [])[0]
    assert vulkan.device_env(base, [dict(SOFT, index=0), dict(SOFT, index=2)])[0][vulkan.VISIBLE_ENV] == "0,2"


class _FakeProbe:
    """Stands in for the probe worker: records the environment it was started with."""
    started: list = []

    def __init__(self, lib, timeout_s=600.0, env=None):
        self.env = env
        _FakeProbe.started.append(env)

    def type_info(self, name):
        return None

    def close(self):
        pass


def test_fork_target_sets_visible_devices_for_a_software_device(tmp_path, monkeypatch):
    # a Vulkan build folder (CMakeCache says so) and a machine whose only Vulkan device is lavapipe
    from harness.targets import fork as tf
    bdir = tmp_path / "vulkan"
    (bdir / "bin").mkdir(parents=True)
    (bdir / "CMakeCache.txt").write_text("GGML_VULKAN:BOOL=ON\n")
    monkeypatch.setattr(tf, "build_probe", lambda b, f: tmp_path / "probe.so")
    monkeypatch.setattr(tf, "Probe", _FakeProbe)
    monkeypatch.delenv(vulkan.VISIBLE_ENV, raising=False)
    listing = [{"name": "Vulkan0", "description": LAVAPIPE, "reg": "Vulkan", "kind": "gpu"},
               {"name": "CPU", "description": "x86", "reg": "CPU", "kind": "cpu"}]
    _FakeProbe.started.clear()
    t = tf.ForkTarget(bdir, tmp_path, devices=listing, vk_devices=[dict(SOFT, index=0)])
    assert _FakeProbe.started[-1][vulkan.VISIBLE_ENV] == "0"
    assert t.env[vulkan.VISIBLE_ENV] == "0"  # test-backend-ops gets the same environment
    assert "Mesa 22.3.6" in t.vulkan["driver"] and "set by the harness" in t.vulkan["visible_devices"]
    vk = t.backends()[0]
    assert vk.name == "vulkan" and vk.software
    assert vk.mode_note == "Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic"
    # a build without Vulkan: nothing is set
    (bdir / "CMakeCache.txt").write_text("GGML_VULKAN:BOOL=OFF\n")
    tf.ForkTarget(bdir, tmp_path, devices=listing[1:], vk_devices=[SOFT])
    assert vulkan.VISIBLE_ENV not in (_FakeProbe.started[-1] or {})


def test_missing_vulkan_device_is_one_clear_line(tmp_path, monkeypatch):
    from harness.errors import HarnessError
    from harness.targets import fork as tf
    from harness.verify import pick_target_backend
    bdir = tmp_path / "vulkan"
    bdir.mkdir()
    (bdir / "CMakeCache.txt").write_text("GGML_VULKAN:BOOL=ON\n")
    monkeypatch.setattr(tf, "build_probe", lambda b, f: tmp_path / "probe.so")
    monkeypatch.setattr(tf, "Probe", _FakeProbe)
    t = tf.ForkTarget(bdir, tmp_path, devices=[{"name": "CPU", "description": "x86", "reg": "CPU", "kind": "cpu"}],
                      vk_devices=[])
    with pytest.raises(HarnessError, match="found no Vulkan device here.*mesa-vulkan-drivers"):
        pick_target_backend(t, "vulkan")


def test_backend_table_marks_software_devices_only():
    assert backends.examination("vulkan", "Vulkan0", LAVAPIPE)[0] == backends.EXECUTED_SOFTWARE
    assert backends.examination("vulkan", "Vulkan0", "NVIDIA GeForce RTX 4090") == (backends.EXECUTED, "")
    assert backends.examination("cpu", "CPU", "llvmpipe-like name") == (backends.EXECUTED, "")
    bs = select_backends([{"name": "Vulkan0", "description": "AMD Radeon", "reg": "Vulkan", "kind": "gpu"}])
    assert not bs[0].software


# ----------------------------------------------------------------------------- writers judged by other readers

def _vk_target(**kw):
    return NumpyTarget(backends=(("cpu", "cpu"), ("vulkan", "gpu")), unreadable={"vulkan": {"turbo2", "turbo4"}},
                       devices={"vulkan": LAVAPIPE}, **kw)


def _writer_cell(cells, t, path="vulkan:set_rows"):
    got = [c for c in cells if c.type == t and c.path == path and c.metric.startswith("writer_")]
    assert len(got) == 1, [(c.path, c.metric, c.verdict, c.caveat) for c in cells if c.type == t]
    return got[0]


def test_a_writer_only_backend_is_judged_by_the_other_readers(make_ctx):
    # the target (vulkan) writes turbo2/turbo4 but reads only turbo3: its bytes are still compared with the CPU's
    # and the reference's, read by the CPU; its own reads of those types are SKIPs (not supported)
    cells = compat.run(make_ctx(_vk_target(), target_backend="vulkan", types=("turbo2", "turbo3")))
    w2 = _writer_cell(cells, "turbo2")
    assert w2.verdict == Verdict.PASS and w2.details["reader"] == "cpu:to_float" and "cannot read it" in w2.caveat
    pair = [c for c in cells if c.type == "turbo2" and c.metric == "pair_real_index_diff_per_element"
            and "vulkan:set_rows" in c.path]
    assert pair and all(c.verdict == Verdict.PASS for c in pair)
    assert _writer_cell(cells, "turbo3").details.get("reader") is None  # reads its own turbo3
    cross = [c for c in cells if c.type == "turbo2" and c.metric == "cross_decode_rel_err"]
    assert any(c.path == "vulkan:set_rows -> cpu:flash_attn" and c.verdict == Verdict.PASS for c in cross)
    # a fault in the writer-only backend's quantiser is found through the other reader
    bad = compat.run(make_ctx(_vk_target(backend_faults={"vulkan": {"thresholds_off"}}), target_backend="vulkan",
                              types=("turbo2",)))
    assert _writer_cell(bad, "turbo2", "cpu:set_rows").verdict in (Verdict.PASS, Verdict.PARTIAL)
    assert any(c.verdict == Verdict.FAIL and "vulkan:set_rows" in c.path and c.metric.startswith(("writer_", "pair_"))
               for c in bad)


# ----------------------------------------------------------------------------- sized for a software device

def test_software_device_runs_fewer_flash_attention_shapes_covering_each_head_dim():
    full, soft = pq6_attention.cases(["turbo3"]), pq6_attention.cases(["turbo3"], software=True)
    assert len(soft) < len(full)
    assert {c["D"] for c in soft if c["tk"] == c["tv"] == "turbo3"} == {64, 128, 256}
    assert any(c["ablate"] for c in soft) and any(c["tk"] == "q8_0" for c in soft) and any(c["tv"] == "q8_0" for c in soft)


def test_software_device_cells_and_coverage_say_how_they_were_examined(tmp_path):
    run = run_checks(_vk_target(), ["PQ1", "PQ6"], ["turbo3"], tmp_path / "r", target_backend="vulkan",
                     log=lambda s: None)
    note = "Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic"
    assert run.meta["backend_modes"]["vulkan"]["mode"] == "software" and run.meta["backend_modes"]["vulkan"]["note"] == note
    assert run.meta["backend_modes"]["cpu"]["mode"] == "executed"
    vk = [c for ch in run.checks for c in ch.cells if c.path.startswith("vulkan:")]
    assert vk and all(note in c.caveat and c.details["examined"]["vulkan"] == note for c in vk)
    assert not any(note in c.caveat for ch in run.checks for c in ch.cells if c.path.startswith("cpu:"))
    pq6_vk = [c for c in run.checks[1].cells if c.path.startswith("vulkan:") and "ablation" not in c.metric]
    pq6_cpu = [c for c in run.checks[1].cells if c.path.startswith("cpu:") and "ablation" not in c.metric]
    assert len(pq6_vk) == len(pq6_attention.cases(["turbo3"], True)) < len(pq6_cpu)


def test_coverage_rows_carry_the_mode(make_ctx):
    rows = compat.coverage(make_ctx(_vk_target(), target_backend="vulkan", types=("turbo3",)))
    assert {r["mode"] for r in rows if r["backend"] == "vulkan"} == {
        "Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic"}
    assert {r["mode"] for r in rows if r["backend"] == "cpu"} == {"executed (CPU)"}


# ----------------------------------------------------------------------------- test-backend-ops time limits

FA_LINES = "\n".join(
    f"  FLASH_ATTN_EXT(hsk=128,hsv=128,nh=4,nr23=[1,1],kv=113,nb={nb},type_KV=turbo3): OK" for nb in (1, 3, 32))


def test_a_group_past_its_time_limit_is_skip_not_run_in_time_with_the_count(tmp_path, make_ctx):
    # a fake test-backend-ops: three FLASH_ATTN_EXT cases pass, then it hangs (as on lavapipe); SET_ROWS_TURBO3 runs
    fake = _exe(tmp_path / "test-backend-ops", f"""import sys, time
op = sys.argv[sys.argv.index('-o') + 1]
print('Backend 1/2: Vulkan0', flush=True)
if op == 'FLASH_ATTN_EXT':
    print({FA_LINES!r}, flush=True)
    time.sleep(30)
else:
    print('  SET_ROWS_TURBO3(type_idx=i32,ne0=128,ne1=16,r=1): OK', flush=True)
""")
    plan = (backend_ops.Group("FLASH_ATTN_EXT", "turbo", 2), backend_ops.Group("SET_ROWS_TURBO3", None, 20))
    res = backend_ops.run(fake, plan=plan, log_path=tmp_path / "tbo.log")
    assert [g["status"] for g in res["groups"]] == ["not run in time", "ran"]
    assert res["groups"][0]["cases"] == 3 and res["returncode"] == 0
    assert "SET_ROWS_TURBO3" in res["command"] and "-p" not in res["command"].split(";")[1]

    class T(NumpyTarget):
        def backend_ops(self, log_path=None):
            return res
    cells, table = backend_ops_cells(make_ctx(T(), types=("turbo3",)))
    skip = [c for c in cells if c.verdict == Verdict.SKIP]
    assert len(skip) == 1 and "not run in time: 3 FLASH_ATTN_EXT cases ran" in skip[0].caveat
    assert skip[0].value == 3
    summary = [c for c in cells if c.metric == "failed_cases"]
    assert summary[0].verdict == Verdict.PASS and summary[0].value == 0  # never 'failing cases'
    assert len(table.rows) == 4


def test_software_plan_selects_set_rows_turbo3_and_few_flash_attention_cases():
    ops = {g.op: g for g in backend_ops.SOFTWARE_PLAN}
    assert "SET_ROWS_TURBO3" in ops and "SET_ROWS_TURBO3" in {g.op for g in backend_ops.PLAN}
    import re
    fa = re.compile(ops["FLASH_ATTN_EXT"].params)
    case = ("hsk=128,hsv=128,nh=4,nr23=[1,1],kv=113,nb=1,mask=1,sinks=0,max_bias=0.000000,logit_softcap=0.000000,"
            "prec=f32,type_KV=turbo3,permute=[0,1,2,3]")
    assert fa.search(case) and not fa.search(case.replace("kv=113", "kv=512"))
    assert not fa.search(case.replace("type_KV=turbo3", "type_KV=f16"))
    assert sum(g.timeout_s for g in backend_ops.SOFTWARE_PLAN) <= 900


# ----------------------------------------------------------------------------- build: headers and targets

def _include(root: Path, version: tuple[int, int, int], layer_settings: bool) -> Path:
    inc = root / "usr" / "include"
    (inc / "vulkan").mkdir(parents=True)
    (inc / "vulkan" / "vulkan_core.h").write_text(
        f"#define VK_HEADER_VERSION {version[2]}\n"
        f"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, {version[0]}, {version[1]}, VK_HEADER_VERSION)\n"
        + ("typedef struct VkLayerSettingEXT {} VkLayerSettingEXT;\n" if layer_settings else ""))
    return inc


def test_old_system_headers_use_the_newer_ones_unpacked_in_the_cache(tmp_path):
    system = _include(tmp_path / "sys", (1, 3, 239), False)
    cached = _include(tmp_path / "cache" / "vulkan-headers" / "1.4.309.0", (1, 4, 309), True)
    (cached.parents[1] / "SOURCE").write_text("Debian trixie libvulkan-dev 1.4.309.0-1\n")
    h = vulkan.ensure_headers(tmp_path / "cache", system=system, log=lambda s: None)
    assert h["include"] == cached and h["version"] == "1.4.309" and "trixie" in h["source"]
    assert h["system_version"] == "1.3.239"
    new_sys = _include(tmp_path / "sys2", (1, 4, 309), True)
    assert vulkan.ensure_headers(tmp_path / "cache", system=new_sys)["source"] == "system"


@pytest.mark.parametrize("text,want", [("GGML_VULKAN:BOOL=ON\n", True), ("GGML_VULKAN:BOOL=OFF\n", False), ("", False)])
def test_build_has_vulkan_reads_the_cmake_cache(tmp_path, text, want):
    (tmp_path / "CMakeCache.txt").write_text(text)
    assert vulkan.build_has_vulkan(tmp_path) is want


def test_writer_cell_values_are_finite_numbers(make_ctx):
    cells = compat.run(make_ctx(_vk_target(), target_backend="vulkan", types=("turbo4",)))
    w = _writer_cell(cells, "turbo4")
    assert np.isfinite(w.value) and w.details["values"] == 2 ** 20


def test_glslc_cache_serves_a_repeated_compile_and_misses_on_any_change(tmp_path):
    import subprocess
    calls = tmp_path / "calls"
    fake = _exe(tmp_path / "fake-glslc", f"""import sys
open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')
a = sys.argv[1:]
out = a[a.index('-o') + 1]
body = ('spv:' + ' '.join(x for x in a if x.startswith('-D'))).encode()
sys.stdout.buffer.write(body) if out == '-' else open(out, 'wb').write(body)
""")
    src = tmp_path / "shaders"
    src.mkdir()
    (src / "a.comp").write_text("void main() {}\n#include \"types.glsl\"\n")
    (src / "types.glsl").write_text("// v1\n")
    env = dict(os.environ, TURBO_GLSLC=str(fake), TURBO_GLSLC_CACHE=str(tmp_path / "cache"))

    def glslc(*args):
        return subprocess.run([str(vulkan.GLSLC_CACHE), "-fshader-stage=compute", *args], env=env, check=True,
                              capture_output=True).stdout
    glslc(str(src / "a.comp"), "-o", str(tmp_path / "1.spv"), "-DX=1")
    glslc(str(src / "a.comp"), "-o", str(tmp_path / "2.spv"), "-DX=1", "-MD", "-MF", str(tmp_path / "2.d"))
    assert len(calls.read_text().splitlines()) == 1  # the second compile came from the cache
    assert (tmp_path / "2.spv").read_bytes() == (tmp_path / "1.spv").read_bytes() == b"spv:-DX=1"
    assert str(src / "types.glsl") in (tmp_path / "2.d").read_text()  # dependencies: the whole shader folder
    glslc(str(src / "a.comp"), "-o", str(tmp_path / "3.spv"), "-DX=2")  # another define
    (src / "types.glsl").write_text("// v2\n")  # an included file changed
    glslc(str(src / "a.comp"), "-o", str(tmp_path / "4.spv"), "-DX=1")
    assert glslc(str(src / "a.comp"), "-o", "-") == b"spv:"  # to stdout: passed through, never cached
    assert len(calls.read_text().splitlines()) == 4


def test_software_device_coverage_skips_slow_unjudged_smoke_runs_and_says_so(make_ctx):
    rows = compat.coverage(make_ctx(_vk_target(), target_backend="vulkan", types=("turbo3",)))
    vk = [r for r in rows if r["backend"] == "vulkan"]
    skipped = [r for r in vk if r["status"].startswith("not run on a software device")]
    assert skipped and all(r["head_dim"] != 128 and not r["pair"] == "turbo3/turbo3" for r in skipped)
    assert all(r["status"].startswith("tested") for r in vk if r["pair"] == "turbo3/turbo3")  # every head_dim judged
    cpu = [r for r in rows if r["backend"] == "cpu"]
    assert not any(r["status"].startswith("not run") for r in cpu)


def test_cases_finished_before_the_time_limit_are_counted_even_from_a_block_buffered_tool(tmp_path):
    # a C tool's printf into a pipe is block-buffered: killed at the limit, its finished cases must still be counted
    import shutil
    if not shutil.which("stdbuf") or not shutil.which("cc"):
        pytest.skip("needs coreutils' stdbuf and a C compiler")
    import subprocess
    src = tmp_path / "tbo.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\nint main(void){printf("Backend 1/2: Vulkan0\\n");'
                   'for(int i=0;i<2;i++) printf("  FLASH_ATTN_EXT(hsk=128,nb=%d,type_KV=turbo3): OK\\n", i);'
                   'sleep(30); return 0;}\n')
    exe = tmp_path / "test-backend-ops"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    res = backend_ops.run(exe, plan=(backend_ops.Group("FLASH_ATTN_EXT", "turbo", 2),))
    assert res["groups"][0]["status"] == "not run in time" and res["groups"][0]["cases"] == 2


def test_an_audited_source_path_does_not_carry_the_execution_note():
    from harness.checks.common import annotate_modes
    from harness.report.model import Cell
    from harness.targets.base import Backend
    vk = Backend("vulkan", "Vulkan0", "gpu", LAVAPIPE, *backends.examination("vulkan", "Vulkan0", LAVAPIPE))
    ran = Cell("PQ1", "turbo3", "vulkan:set_rows", "m", 0.0, 1.0, Verdict.PASS)
    audited = Cell("AUDIT", "turbo4", "vulkan:source", "m", 0.0, 1.0, Verdict.PASS)
    annotate_modes([ran, audited], [vk])
    assert "software device" in ran.caveat and "software device" not in audited.caveat


VK_SAMPLE = Path(__file__).resolve().parents[1] / "reports" / "samples" / "vulkan-lavapipe"


@pytest.mark.skipif(not (VK_SAMPLE / "run.json").is_file(), reason="Vulkan sample report not present")
def test_the_vulkan_sample_judges_every_vulkan_writer_and_passes_its_known_findings_gate():
    import json

    from harness.known import apply_known, gate_exit_code, load_known
    from harness.report.model import Run
    run = Run.from_dict(json.loads((VK_SAMPLE / "run.json").read_text()))
    assert run.meta["vulkan"]["headers"] >= "1.3.261" and "llvmpipe" in run.meta["target"]["vulkan"]["driver"]
    compat_cells = next(c for c in run.checks if c.id == "COMPAT").cells
    for t in ("turbo2", "turbo3", "turbo4"):  # every turbo type's Vulkan writer, against the reference and the CPU
        w = [c for c in compat_cells if c.type == t and c.path == "vulkan:set_rows" and c.metric.startswith("writer_")]
        pair = [c for c in compat_cells if c.type == t and c.path == "cpu:set_rows x vulkan:set_rows"]
        assert w and w[0].verdict != Verdict.SKIP and pair and pair[0].verdict != Verdict.SKIP, t
    known = Path(__file__).resolve().parents[1] / "checks" / "known-findings-vulkan.toml"
    apply_known(run, load_known(known), str(known))
    assert gate_exit_code(run, False) == 0


def test_a_writer_no_backend_reads_exactly_keeps_its_measured_verdict(make_ctx, monkeypatch):
    """The writer's bytes are compared with the reference quantiser's through the reference decoder; naming a backend
    reader is only the caveat. When none read the type exactly (only lossy routes), byte_reader's Unsupported turned
    the measured FAIL into a SKIP 'not supported'."""
    real = compat.byte_reader

    def no_reader(ctx, backend, t):
        if backend == "vulkan":
            raise Unsupported("no exact decode route for turbo2 (emulated)")
        return real(ctx, backend, t)
    monkeypatch.setattr(compat, "byte_reader", no_reader)
    bad = compat.run(make_ctx(_vk_target(backend_faults={"vulkan": {"uncorrected_norm"}}), target_backend="vulkan",
                              types=("turbo2",)))
    w = _writer_cell(bad, "turbo2")
    assert w.verdict == Verdict.FAIL and "read by the reference decoder" in w.caveat, (w.verdict, w.caveat)


def test_backend_ops_with_no_case_tested_is_skip_not_pass(make_ctx):
    """Every case 'not supported' (a backend that takes none of the turbo ops): 0 FAIL of 0 run was a PASS."""
    res = {"command": "test-backend-ops -o SET_ROWS", "note": "", "returncode": 0, "groups": [],
           "results": [{"backend": "Vulkan0", "op": "SET_ROWS", "params": f"type={t}", "status": "not supported",
                        "error": None, "metric": None, "max_error": None} for t in ("turbo3", "turbo4")]}

    class T(NumpyTarget):
        def backend_ops(self, log_path=None):
            return res
    cells, _ = backend_ops_cells(make_ctx(T(), types=("turbo3",)))
    c = next(c for c in cells if c.metric == "failed_cases")
    assert c.verdict == Verdict.SKIP and c.caveat.startswith("no case was tested: 0 OK, 0 FAIL, 2 not supported")


def test_examination_table_says_executed_only_where_a_cell_measured_it(make_ctx):
    """Vulkan writes turbo2 but cannot read it: the examination table said 'executed on a software device: cpy' for
    its turbo2 decode and 'executed' for its turbo2 attention (the routes the backend table offers, for every type)."""
    from harness.checks import pq4_layout
    from harness.checks.examined import examination
    ctx = make_ctx(_vk_target(), target_backend="vulkan", types=("turbo2", "turbo3"))
    ctx.done = {"PQ4": list(pq4_layout.run(ctx)), "COMPAT": list(compat.run(ctx))}
    rows = {(r[0], r[1], r[2]): r[3] for r in examination(ctx, {}).rows}
    assert rows[("vulkan", "turbo2", "decode")].startswith("not examined on vulkan: "), rows[("vulkan", "turbo2", "decode")]
    assert "cannot read turbo2" in rows[("vulkan", "turbo2", "decode")]
    assert rows[("vulkan", "turbo2", "attention")].startswith("not examined on vulkan: ")
    assert rows[("vulkan", "turbo2", "quantize")] == "executed on a software device (llvmpipe (LLVM 15.0.6, 256 bits)): set_rows"
    assert rows[("vulkan", "turbo3", "decode")].endswith(": get_rows") and rows[("vulkan", "turbo3", "attention")] \
        .startswith("executed on a software device")
    assert rows[("cpu", "turbo2", "decode")].startswith("executed")


def test_verdict_line_names_how_backends_were_examined_without_audit(tmp_path):
    """Spec: the verdict line names the backends executed and those only audited. It did so only through AUDIT's
    table: a run of other checks said nothing of which backends ran, on what device, and which were not examined."""
    from harness.report.findings import verdict_line
    run = run_checks(_vk_target(), ["PQ4"], ["turbo3"], tmp_path / "r", target_backend="vulkan", log=lambda s: None)
    line = verdict_line(run)
    assert line.endswith("[executed: cpu; executed on a software device: vulkan; not examined: cuda, metal, hip "
                         "(no source audit in this report)]"), line
