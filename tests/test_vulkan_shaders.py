"""Optional Vulkan shader sets on a software device (issue 19's build speed): the glslc wrapper fails the fork's CMake
feature probe for sets left out, the plan leaves out only what no device here can use (never on a GPU machine), and
the build record and the reports say what was left out and how many variants were built."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.fork import vulkan
from harness.fork import vulkan_shaders as vs
from harness.report.facts import shaders_fact

SOFT = {"index": 0, "type": vulkan.SOFTWARE_TYPE, "name": "llvmpipe (LLVM 15.0.6, 256 bits)",
        "driver_name": "llvmpipe", "driver_info": "Mesa 22.3.6", "api": "1.3.230"}
GPU = {"index": 1, "type": "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "name": "NVIDIA H100", "driver_name": "NVIDIA",
       "driver_info": "550", "api": "1.3"}
# what lavapipe of Mesa 22.3.6 reports (vulkaninfo): the integer-dot extension, but not accelerated (ggml then does
# not use its shaders); no cooperative matrix, no bfloat16
LAVAPIPE_INFO = """GPU0:
VkPhysicalDeviceProperties:
\tdeviceType = PHYSICAL_DEVICE_TYPE_CPU
\tintegerDotProduct4x8BitPackedSignedAccelerated                                = false
Device Extensions: count = 3
\tVK_KHR_shader_float16_int8                   : extension revision 1
\tVK_KHR_shader_integer_dot_product            : extension revision 1
\tVK_EXT_subgroup_size_control                 : extension revision 2
"""
ALL_GL = {gl for gl, *_ in vs.SHADER_FEATURES.values()}
# the fork's CMake probe (ggml/src/ggml-vulkan/CMakeLists.txt, test_shader_extension_support): unsupported when
# glslc's stderr matches this
CMAKE_UNSUPPORTED = ".*extension not supported: {}.*"


def _exe(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_glslc(tmp_path):
    """A glslc that compiles everything (every extension supported), logging its calls."""
    calls = tmp_path / "calls"
    exe = _exe(tmp_path / "fake-glslc", f"""import sys
open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')
a = sys.argv[1:]
out = a[a.index('-o') + 1]
sys.stdout.buffer.write(b'spv') if out == '-' else open(out, 'wb').write(b'spv')
""")
    return exe, calls


def _feature_tests(root: Path) -> Path:
    """A fork-like checkout holding the four feature-test shaders (one #extension line each)."""
    d = root / vs.FEATURE_TESTS
    d.mkdir(parents=True)
    for gl, name, *_ in vs.SHADER_FEATURES.values():
        (d / name).write_text(f"#version 460\n\n#extension {gl} : require\n\nvoid main() {{}}\n")
    return root


def _probe(exe, src: Path, env: dict) -> subprocess.CompletedProcess:
    """The call the fork's CMake makes for one feature test."""
    return subprocess.run([str(exe), "-o", "-", "-fshader-stage=compute", "--target-env=vulkan1.3", str(src)],
                          capture_output=True, text=True, env=env)


def test_wrapper_fails_only_the_probes_of_the_listed_extensions(tmp_path, fake_glslc):
    exe, calls = fake_glslc
    fork = _feature_tests(tmp_path / "fork")
    tests = fork / vs.FEATURE_TESTS
    env = dict(os.environ, TURBO_GLSLC=str(exe), TURBO_GLSLC_CACHE=str(tmp_path / "cache"),
               TURBO_GLSLC_WITHOUT="GL_KHR_cooperative_matrix,GL_EXT_bfloat16")
    cm1, cm2, bf16 = _probe(vulkan.GLSLC_CACHE, tests / "coopmat.comp", env), \
        _probe(vulkan.GLSLC_CACHE, tests / "coopmat2.comp", env), _probe(vulkan.GLSLC_CACHE, tests / "bfloat16.comp", env)
    assert cm1.returncode != 0 and re.match(CMAKE_UNSUPPORTED.format("GL_KHR_cooperative_matrix"), cm1.stderr, re.S)
    assert bf16.returncode != 0 and re.match(CMAKE_UNSUPPORTED.format("GL_EXT_bfloat16"), bf16.stderr, re.S)
    assert cm2.returncode == 0 and "not supported" not in cm2.stderr  # not listed: glslc's own answer
    assert calls.read_text().count("coopmat2.comp") == 1 and "coopmat.comp" not in calls.read_text()
    # a real shader compile (-o FILE) of a listed extension is never blocked; without the variable nothing is
    r = subprocess.run([str(vulkan.GLSLC_CACHE), "-fshader-stage=compute", str(tests / "coopmat.comp"), "-o",
                        str(tmp_path / "x.spv")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "x.spv").read_bytes() == b"spv"
    env.pop("TURBO_GLSLC_WITHOUT")
    assert _probe(vulkan.GLSLC_CACHE, tests / "coopmat.comp", env).returncode == 0


def test_a_listed_name_does_not_block_a_longer_extension_name(tmp_path, fake_glslc):
    exe, _ = fake_glslc
    src = tmp_path / "cm2.comp"
    src.write_text("#version 460\n#extension GL_NV_cooperative_matrix2 : require\nvoid main() {}\n")
    env = dict(os.environ, TURBO_GLSLC=str(exe), TURBO_GLSLC_WITHOUT="GL_NV_cooperative_matrix")
    assert _probe(vulkan.GLSLC_CACHE, src, env).returncode == 0


def test_plan_leaves_out_on_a_software_device_only_what_no_device_can_use():
    have_all = {k: True for k in vs.SHADER_FEATURES}
    usable = vs.device_features(LAVAPIPE_INFO)
    assert usable == set()  # int-dot's extension is there, but not accelerated: ggml would not use it
    plan = vs.shader_plan([SOFT], usable, have_all)
    assert plan["software_build"] and set(plan["without"]) == ALL_GL
    assert all(v.startswith("not compiled: built for a software device") for v in plan["features"].values())
    assert plan["note"].startswith("built for a software device: coopmat/coopmat2/int-dot/bf16 shaders not compiled")
    # a device that can use a set keeps it, even a software one
    info = LAVAPIPE_INFO.replace("= false", "= true") + "\tVK_KHR_cooperative_matrix : extension revision 2\n"
    plan = vs.shader_plan([SOFT], vs.device_features(info), have_all)
    assert plan["features"]["coopmat"] == plan["features"]["int-dot"] == "compiled"
    assert set(plan["without"]) == {"GL_NV_cooperative_matrix2", "GL_EXT_bfloat16"}


@pytest.mark.parametrize("devices,usable", [([GPU, SOFT], set()), ([GPU], set()), (None, set()), ([SOFT], None)],
                         ids=["gpu-and-software", "gpu", "devices-unknown", "features-unknown"])
def test_plan_keeps_every_set_on_a_gpu_or_when_unknown(devices, usable):
    plan = vs.shader_plan(devices, usable, {k: True for k in vs.SHADER_FEATURES})
    assert plan["without"] == [] and set(plan["features"].values()) == {"compiled"} and plan["note"] == ""


def test_plan_says_which_sets_glslc_lacks(tmp_path):
    fork = _feature_tests(tmp_path / "fork")
    glslc = _exe(tmp_path / "old-glslc", """import sys
src = open(sys.argv[-1]).read()
for ext in ('GL_NV_cooperative_matrix2', 'GL_EXT_bfloat16'):
    if ext in src:
        sys.stderr.write(sys.argv[-1] + ":3: error: '#extension' : extension not supported: " + ext + "\\n")
        sys.exit(1)
""")
    have = vs.glslc_features(fork, str(glslc))
    assert have == {"coopmat": True, "coopmat2": False, "int-dot": True, "bf16": False}
    plan = vs.shader_plan([SOFT], set(), have)
    assert set(plan["without"]) == {"GL_KHR_cooperative_matrix", "GL_EXT_integer_dot_product"}
    assert plan["features"]["bf16"] == "not compiled: glslc lacks GL_EXT_bfloat16"
    assert "coopmat2/bf16: glslc lacks" in plan["note"] and "coopmat/int-dot left out" in plan["note"]


def test_build_record_names_the_left_out_sets_and_the_wrapper_applies_them(tmp_path, monkeypatch, fake_glslc):
    exe, _ = fake_glslc
    fork = _feature_tests(tmp_path / "fork")
    bdir = tmp_path / "build"
    monkeypatch.setattr(vulkan, "install_packages", lambda log: [])
    monkeypatch.setattr(vulkan, "ensure_headers", lambda log: {"include": Path("/usr/include"), "version": "1.4.309",
                                                               "source": "system"})
    monkeypatch.setattr(vulkan, "list_devices", lambda *a, **k: [SOFT])
    monkeypatch.setattr(vs, "vulkaninfo_text", lambda *a, **k: LAVAPIPE_INFO)
    monkeypatch.setattr(vs, "glslc_features", lambda fork, glslc="glslc": {k: True for k in vs.SHADER_FEATURES})
    opts, _, record = vulkan.prepare_build(lambda s: None, fork=fork, bdir=bdir)
    wrapper = bdir / "turbo-glslc"
    assert f"-DVulkan_GLSLC_EXECUTABLE={wrapper}" in opts
    assert set(record["shaders"]["without"]) == ALL_GL and "coopmat/coopmat2/int-dot/bf16" in record["shaders"]["note"]
    json.dumps(record)  # the record is written as JSON
    env = dict(os.environ, TURBO_GLSLC=str(exe), TURBO_GLSLC_CACHE="off")
    env.pop("TURBO_GLSLC_WITHOUT", None)  # the wrapper carries the list itself (CMake re-runs in another env)
    for gl, name, *_ in vs.SHADER_FEATURES.values():
        r = _probe(wrapper, fork / vs.FEATURE_TESTS / name, env)
        assert r.returncode != 0 and re.match(CMAKE_UNSUPPORTED.format(gl), r.stderr, re.S)
    # a GPU machine: glslc-cache itself, no wrapper, nothing left out
    monkeypatch.setattr(vulkan, "list_devices", lambda *a, **k: [GPU])
    opts, _, record = vulkan.prepare_build(lambda s: None, fork=fork, bdir=tmp_path / "gpu")
    assert f"-DVulkan_GLSLC_EXECUTABLE={vulkan.GLSLC_CACHE}" in opts and record["shaders"]["without"] == []
    assert not (tmp_path / "gpu" / "turbo-glslc").exists()


def test_variants_are_counted_from_the_generated_header_and_shown_in_the_report(tmp_path):
    hdr = tmp_path / "ggml" / "src" / "ggml-vulkan" / "ggml-vulkan-shaders.hpp"
    hdr.parent.mkdir(parents=True)
    names = ["matmul_f32_f32", "matmul_f16_cm1", "matmul_f16_cm2", "matmul_q4_0_q8_1", "mul_mat_vec_q4_0_q8_1_f32",
             "flash_attn_f32_f16_q4_0_int8", "set_rows_turbo3_0"]
    hdr.write_text("".join(f"extern const uint64_t {n}_len;\nextern const unsigned char {n}_data[];\n\n" for n in names))
    v = vs.shader_variants(tmp_path)
    assert v == {"total": 7, "coopmat": 1, "coopmat2": 1, "int-dot": 3}
    assert vs.shader_variants(tmp_path / "none") is None
    plan = vs.shader_plan([SOFT], set(), {k: True for k in vs.SHADER_FEATURES})
    fact = shaders_fact({**plan, "variants": v})
    assert fact.startswith("; 7 shader variants; built for a software device: coopmat/coopmat2/int-dot/bf16")
    assert shaders_fact(None) == ""


def test_ccache_env_reaches_the_projects_a_build_configures_itself(tmp_path):
    from harness.fork.cmake_util import ccache_env
    env = ccache_env({"PATH": "/usr/bin"}, tmp_path / "src", tmp_path / "build")
    # CMake's default launcher from the environment: ggml-vulkan's ExternalProject vulkan-shaders-gen gets ccache too
    assert env["CMAKE_C_COMPILER_LAUNCHER"] == env["CMAKE_CXX_COMPILER_LAUNCHER"] == "ccache"
    assert env["CCACHE_BASEDIR"] == str(tmp_path.resolve())
    mine = ccache_env({"CMAKE_CXX_COMPILER_LAUNCHER": "sccache", "CCACHE_BASEDIR": "/x"}, tmp_path / "s", tmp_path / "b")
    assert mine["CMAKE_CXX_COMPILER_LAUNCHER"] == "sccache" and mine["CCACHE_BASEDIR"] == "/x"  # the user's kept
