"""ggml-vulkan's optional shader sets (cooperative matrix 1 and 2, integer dot product, bfloat16) on this machine:
which ones a build compiles, and how many shader variants it holds.

The fork's CMake tests glslc for each set's GLSL extension (``test_shader_extension_support`` in
ggml/src/ggml-vulkan/CMakeLists.txt, compiling ``vulkan-shaders/feature-tests/<file>`` with ``-o -``) and compiles the
set's variants only when glslc has it. On a machine whose Vulkan devices are all software ones (lavapipe), a set no
device can use (ggml-vulkan.cpp needs the device extension, for int-dot also the 'accelerated' property) is left out:
``glslc-cache`` fails that probe (``TURBO_GLSLC_WITHOUT``, through ``<bdir>/turbo-glslc``), so its variants are
neither compiled nor embedded. A GPU build keeps every set glslc supports. The build record (``vulkan.shaders``) and
every report say what was left out and why (:func:`shader_plan`) and how many variants were built
(:func:`shader_variants`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from harness.fork.vulkan import GLSLC_CACHE, is_software

# ggml-vulkan's optional shader sets: the GLSL extension its CMake probe tests glslc for (ggml-vulkan/CMakeLists.txt,
# test_shader_extension_support on vulkan-shaders/feature-tests/<file>), and what ggml-vulkan.cpp needs of a device
# before it uses them (ggml_vk_get_device: the device extension, for int-dot also the 'accelerated' property)
SHADER_FEATURES = {  # key: (GLSL extension, feature-test file, device extension, device property or None)
    "coopmat": ("GL_KHR_cooperative_matrix", "coopmat.comp", "VK_KHR_cooperative_matrix", None),
    "coopmat2": ("GL_NV_cooperative_matrix2", "coopmat2.comp", "VK_NV_cooperative_matrix2", None),
    "int-dot": ("GL_EXT_integer_dot_product", "integer_dot.comp", "VK_KHR_shader_integer_dot_product",
                "integerDotProduct4x8BitPackedSignedAccelerated"),
    "bf16": ("GL_EXT_bfloat16", "bfloat16.comp", "VK_KHR_shader_bfloat16", None),
}
FEATURE_TESTS = Path("ggml") / "src" / "ggml-vulkan" / "vulkan-shaders" / "feature-tests"


def vulkaninfo_text(timeout_s: float = 60.0) -> str | None:
    """The full ``vulkaninfo`` output (every device's extensions and properties); None when it is not installed or
    fails."""
    exe = shutil.which("vulkaninfo")
    if not exe:
        return None
    try:
        r = subprocess.run([exe], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def device_features(text: str | None) -> set[str] | None:
    """The :data:`SHADER_FEATURES` some device of a ``vulkaninfo`` output could use: its device extension is listed
    (``VK_KHR_cooperative_matrix : extension revision 2``) and, where ggml also needs a property, that property is
    ``true`` on some device. A superset (the whole output is searched, every device at once). None when unknown."""
    if text is None:
        return None
    out = set()
    for key, (_, _, ext, prop) in SHADER_FEATURES.items():
        if re.search(rf"^\s*{ext}\s*:\s*extension revision", text, re.M) and (
                prop is None or re.search(rf"^\s*{prop}\s*=\s*true\s*$", text, re.M)):
            out.add(key)
    return out


def glslc_features(fork: Path, glslc: str = "glslc") -> dict[str, bool]:
    """Which :data:`SHADER_FEATURES` this glslc compiles, tested as the fork's CMake does (``glslc -o -
    -fshader-stage=compute --target-env=vulkan1.3 feature-tests/<file>``; unsupported when it says "extension not
    supported: <GLSL extension>"). Features whose test file the checkout lacks are not listed."""
    out = {}
    for key, (gl, name, _, _) in SHADER_FEATURES.items():
        f = Path(fork) / FEATURE_TESTS / name
        if not f.is_file():
            continue
        try:
            r = subprocess.run([glslc, "-o", "-", "-fshader-stage=compute", "--target-env=vulkan1.3", str(f)],
                               capture_output=True, text=True, timeout=60)
            out[key] = f"extension not supported: {gl}" not in r.stderr
        except (OSError, subprocess.TimeoutExpired):
            out[key] = False
    return out


def shader_plan(devices: list[dict] | None, usable: set[str] | None, glslc_has: dict[str, bool] | None) -> dict:
    """Which optional shader sets a build compiles. Every set glslc supports is compiled, except on a machine whose
    Vulkan devices are all software ones (lavapipe): there a set no device can use (:func:`device_features`) is left
    out, by failing the fork's CMake probe for it (``TURBO_GLSLC_WITHOUT`` of ``glslc-cache``). A GPU build, or one
    where the devices or their features are unknown, keeps every set.

    Returns:
        {'software_build': bool, 'without': [GLSL extensions the probe is to fail], 'features': {key: 'compiled' |
        'not compiled: <why>'}, 'note': one line for the record and the reports ('' when everything is compiled)}.
    """
    software = bool(devices) and all(is_software(d) for d in devices)
    names = ", ".join(d["name"] for d in devices or [])
    status, without = {}, []
    for key, (gl, _, ext, prop) in SHADER_FEATURES.items():
        if glslc_has is not None and key not in glslc_has:
            continue
        if glslc_has is not None and not glslc_has[key]:
            status[key] = f"not compiled: glslc lacks {gl}"
        elif software and usable is not None and key not in usable:
            status[key] = f"not compiled: built for a software device ({names} lacks {ext}{' ' + prop if prop else ''})"
            without.append(gl)
        else:
            status[key] = "compiled"
    left = [k for k, v in status.items() if v != "compiled"]
    lacks = [k for k in left if status[k].startswith("not compiled: glslc")]
    parts = []
    if without:
        parts.append(f"{'/'.join(k for k in left if k not in lacks)} left out: {names} cannot use them")
    if lacks:
        parts.append(f"{'/'.join(lacks)}: glslc lacks their GLSL extensions"
                     + (f"; {names} could not use them either" if software and usable is not None
                        and not set(lacks) & usable else ""))
    note = (f"{'built for a software device: ' if software else ''}{'/'.join(left)} shaders not compiled "
            f"({'; '.join(parts)})") if left else ""
    return {"software_build": software, "without": without, "features": status, "note": note}


def shader_variants(bdir: Path) -> dict | None:
    """The shader variants a built folder holds, read from ggml-vulkan's generated header
    (``<bdir>/ggml/src/ggml-vulkan/ggml-vulkan-shaders.hpp``, one ``extern const unsigned char <name>_data[];`` per
    variant): {'total': n, 'coopmat': n (names with ``_cm1``), 'coopmat2': n (``_cm2``), 'int-dot': n (the ``_q8_1``
    matmul/mat-vec and ``_int8`` flash-attention variants)}; None when there is no header."""
    f = Path(bdir) / "ggml" / "src" / "ggml-vulkan" / "ggml-vulkan-shaders.hpp"
    if not f.is_file():
        return None
    names = re.findall(r"^extern const unsigned char (\w+)_data\[\];", f.read_text(errors="replace"), re.M)
    return {"total": len(names), "coopmat": sum("_cm1" in n for n in names),
            "coopmat2": sum("_cm2" in n for n in names),
            "int-dot": sum(bool(re.match(r"(matmul|mul_mat_vec).*_q8_1", n) or n.endswith("_int8")) for n in names)}


def glslc_wrapper(bdir: Path, without: list[str]) -> Path:
    """Write ``<bdir>/turbo-glslc``: :data:`GLSLC_CACHE` with ``TURBO_GLSLC_WITHOUT`` set to ``without``, passed as
    the build's Vulkan_GLSLC_EXECUTABLE (so the choice holds whoever runs the build, CMake re-runs included)."""
    bdir.mkdir(parents=True, exist_ok=True)
    exe = bdir / "turbo-glslc"
    text = (f"#!/bin/sh\n# made by turbo-harness (harness/fork/vulkan.py, glslc_wrapper): shader sets left out of this "
            f"build\nTURBO_GLSLC_WITHOUT='{','.join(without)}' exec '{GLSLC_CACHE}' \"$@\"\n")
    if not exe.is_file() or exe.read_text() != text:
        exe.write_text(text)
        exe.chmod(0o755)
    return exe
