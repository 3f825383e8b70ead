"""Vulkan on this machine: the packages a build needs, headers new enough for the fork, the devices and driver.

- Packages (Debian): ``mesa-vulkan-drivers`` (Mesa's lavapipe, a conformant software Vulkan device on the CPU),
  ``glslc`` (the shader compiler ggml-vulkan's build runs), ``libvulkan-dev`` (the loader), ``spirv-headers``
  and ``vulkan-tools`` (``vulkaninfo``, which lists the devices and their driver). :func:`install_packages` installs the missing ones
  with apt-get when it can.
- Headers: the fork's ggml-vulkan uses ``VK_EXT_layer_settings`` (``vk::LayerSettingEXT``), which Debian 12's
  headers (1.3.239) lack. :func:`ensure_headers` returns the system's include folder when it has that extension,
  else Debian's newer ``libvulkan-dev`` package, fetched with ``apt-get download`` from the next Debian suite
  (a private apt state under ``.cache/``, the system's own sources untouched) and unpacked with ``dpkg -x`` into
  ``.cache/vulkan-headers/<version>/``: never into the repository.
- Devices: ggml-vulkan uses only discrete and integrated GPUs unless ``GGML_VK_VISIBLE_DEVICES`` names device
  indices (ggml-vulkan.cpp, ``ggml_vk_instance_init``), so on a machine whose only Vulkan devices are CPU-type
  (lavapipe) ggml sees none. :func:`device_env` names them itself (:data:`VISIBLE_ENV`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from harness.errors import HarnessError

VISIBLE_ENV = "GGML_VK_VISIBLE_DEVICES"  # ggml-vulkan.cpp: indices into the loader's physical-device list
NEEDED_SYMBOL = "VkLayerSettingEXT"  # VK_EXT_layer_settings, used by the fork's ggml-vulkan.cpp
NEWER_SUITE = "trixie"  # Debian 13: libvulkan-dev 1.4.309 (has VK_EXT_layer_settings)
HEADERS_PACKAGE = "libvulkan-dev"
PACKAGES = {"mesa-vulkan-drivers": "a Vulkan driver (lavapipe)", "glslc": "the shader compiler",
            "libvulkan-dev": "the Vulkan loader", "vulkan-tools": "vulkaninfo",
            "spirv-headers": "SPIR-V headers (ggml-vulkan.cpp includes spirv/unified1/spirv.hpp)"}
SOFTWARE_TYPE = "PHYSICAL_DEVICE_TYPE_CPU"
GLSLC_CACHE = Path(__file__).resolve().parent / "glslc-cache"  # glslc with a cache of its outputs (see the script)


def cache_dir() -> Path:
    """Where fetched headers and the private apt state live: ``.cache/`` of the harness checkout (ignored by git)."""
    from harness.fork.build import REPO_ROOT
    return Path(os.environ.get("TURBO_CACHE") or (REPO_ROOT / ".cache"))


def header_version(include: Path) -> str | None:
    """The Vulkan header version of an include folder ('1.4.309'), or None when it holds no vulkan_core.h.

    Read from ``VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, major, minor, VK_HEADER_VERSION)`` and
    ``VK_HEADER_VERSION`` in vulkan/vulkan_core.h.
    """
    f = Path(include) / "vulkan" / "vulkan_core.h"
    if not f.is_file():
        return None
    text = f.read_text(errors="replace")
    patch = re.search(r"#define VK_HEADER_VERSION (\d+)", text)
    mm = re.search(r"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\d+, (\d+), (\d+),", text)
    if not patch:
        return None
    return f"{mm.group(1)}.{mm.group(2)}.{patch.group(1)}" if mm else f"?.?.{patch.group(1)}"


def headers_ok(include: Path) -> bool:
    """True when an include folder's Vulkan headers have what the fork uses (:data:`NEEDED_SYMBOL`)."""
    f = Path(include) / "vulkan" / "vulkan_core.h"
    return f.is_file() and NEEDED_SYMBOL in f.read_text(errors="replace")


def _missing_packages() -> list[str]:
    """The Debian packages of :data:`PACKAGES` whose files are not on this machine."""
    have_icd = any(Path(d).glob("*.json") for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d") if Path(d).is_dir())
    have_loader = any(Path(d).glob("libvulkan.so*") for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                                                              "/usr/lib", "/usr/local/lib") if Path(d).is_dir())
    checks = {"mesa-vulkan-drivers": have_icd, "glslc": bool(shutil.which("glslc")), "libvulkan-dev": have_loader,
              "vulkan-tools": bool(shutil.which("vulkaninfo")),
              "spirv-headers": Path("/usr/include/spirv/unified1/spirv.hpp").is_file()}
    return [p for p, ok in checks.items() if not ok]


def install_packages(log=print) -> list[str]:
    """Install the missing packages of :data:`PACKAGES` with apt-get (as root); returns those installed.

    Raises:
        HarnessError: a package is missing and cannot be installed here (not root, no apt-get, apt failed),
            naming the packages and the command.
    """
    missing = _missing_packages()
    if not missing:
        return []
    cmd = ["apt-get", "install", "-y", "-qq", *missing]
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise HarnessError(f"the Vulkan build needs {', '.join(f'{p} ({PACKAGES[p]})' for p in missing)}: install "
                           f"them (`sudo {' '.join(cmd[:3])} {' '.join(missing)}`, or your system's equivalent)")
    log(f"installing {' '.join(missing)} (apt-get) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:  # a stale package list: update once and try again
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"apt-get could not install {' '.join(missing)}: {last[:200]}")
    return missing


def _debian_uri() -> str | None:
    """The Debian archive URI this machine's apt already uses (deb822 or one-line sources), or None."""
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            uri = m.group(1) or m.group(2)
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return None


def fetch_headers(cache: Path, log=print) -> Path:
    """Download Debian's :data:`HEADERS_PACKAGE` of :data:`NEWER_SUITE` and unpack it under
    ``cache/vulkan-headers/<version>``; returns its include folder.

    The package list is read into a private apt state (``cache/apt``): the system's sources are not changed.

    Raises:
        HarnessError: no apt-get/dpkg, no Debian archive configured, or the download failed (with the fix).
    """
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise HarnessError("the fork needs Vulkan headers with VK_EXT_layer_settings (1.3.261 or newer) and this "
                           "machine has neither such headers nor apt-get to fetch them: install a newer Vulkan SDK or "
                           "libvulkan-dev and rebuild")
    uri = _debian_uri()
    if not uri:
        raise HarnessError("the fork needs Vulkan headers newer than this system's and no Debian archive is configured "
                           "in /etc/apt to fetch libvulkan-dev from: install a newer Vulkan SDK and rebuild")
    apt = Path(cache) / "apt"
    for d in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    src = apt / f"{NEWER_SUITE}.sources"
    src.write_text(f"Types: deb\nURIs: {uri}\nSuites: {NEWER_SUITE}\nComponents: main\n"
                   f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    opts = ["-o", f"Dir::Etc::SourceList={src}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
            "-o", "APT::Sandbox::User=root", "-qq"]
    log(f"fetching {HEADERS_PACKAGE} from Debian {NEWER_SUITE} (the fork needs newer Vulkan headers) ...")
    for args in (["update"], ["download", HEADERS_PACKAGE]):
        r = subprocess.run(["apt-get", *opts, *args], capture_output=True, text=True, cwd=apt)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise HarnessError(f"apt-get {args[0]} of {HEADERS_PACKAGE} from Debian {NEWER_SUITE} failed: {last[:200]}")
    debs = sorted(apt.glob(f"{HEADERS_PACKAGE}_*.deb"))
    if not debs:
        raise HarnessError(f"apt-get download left no {HEADERS_PACKAGE} package in {apt}")
    deb = debs[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout.strip()
    dest = Path(cache) / "vulkan-headers" / (version.split("-")[0] or deb.stem)
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        raise HarnessError(f"dpkg -x {deb.name} failed: {r.stderr.strip()[:200]}")
    (dest / "SOURCE").write_text(f"Debian {NEWER_SUITE} {HEADERS_PACKAGE} {version} ({deb.name})\n")
    return dest / "usr" / "include"


def ensure_headers(cache: Path | None = None, system: Path = Path("/usr/include"), log=print) -> dict:
    """Vulkan headers the fork builds with.

    Returns:
        {'include': Path, 'version': '1.4.309', 'source': 'system' | 'Debian trixie libvulkan-dev ...'}: the system
        folder when it has :data:`NEEDED_SYMBOL`, else headers unpacked earlier under ``cache/vulkan-headers``
        (newest first), else freshly fetched ones (:func:`fetch_headers`).
    Raises:
        HarnessError: none found and none could be fetched.
    """
    if headers_ok(system):
        return {"include": system, "version": header_version(system), "source": "system"}
    cache = Path(cache or cache_dir())
    unpacked = sorted((cache / "vulkan-headers").glob("*/usr/include"), key=lambda p: header_version(p) or "", reverse=True)
    good = [p for p in unpacked if headers_ok(p)]
    inc = good[0] if good else fetch_headers(cache, log)
    if not headers_ok(inc):
        raise HarnessError(f"the Vulkan headers fetched into {inc} ({header_version(inc)}) lack VK_EXT_layer_settings: "
                           f"install a newer Vulkan SDK and rebuild")
    src_file = inc.parents[1] / "SOURCE"
    source = src_file.read_text().strip() if src_file.is_file() else f"unpacked in {inc.parents[1]}"
    return {"include": inc, "version": header_version(inc), "source": source,
            "system_version": header_version(system)}


def prepare_build(log=print, fork: Path | None = None, bdir: Path | None = None) -> tuple[list[str], dict, dict]:
    """What a Vulkan build of the fork needs on this machine: packages installed, headers found or fetched, and the
    shader sets worth compiling (:func:`harness.fork.vulkan_shaders.shader_plan`).

    Args:
        fork: the checkout (its glslc feature tests are run); bdir: the build folder (holds ``turbo-glslc`` when
            shader sets are left out for a software device). Without them every shader set glslc supports is built.
    Returns:
        (extra CMake options (``-DVulkan_INCLUDE_DIR=...``; ``-DVulkan_GLSLC_EXECUTABLE=`` :data:`GLSLC_CACHE`, glslc
        behind a cache of its SPIR-V outputs, since ccache does not cache shaders, or ``<bdir>/turbo-glslc``, the
        same with ``TURBO_GLSLC_WITHOUT``), environment additions (``CPATH`` with the headers first), the build
        record's ``vulkan`` entry: {'headers', 'headers_source', 'glslc', 'driver', 'shaders'}).
    Raises:
        HarnessError: a package or the headers cannot be had (see :func:`install_packages`, :func:`ensure_headers`).
    """
    install_packages(log)
    h = ensure_headers(log=log)
    inc = str(h["include"])
    env = {}
    if h["source"] != "system":
        env["CPATH"] = inc + (os.pathsep + os.environ["CPATH"] if os.environ.get("CPATH") else "")
    glslc = subprocess.run(["glslc", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    from harness.fork.vulkan_shaders import device_features, glslc_features, glslc_wrapper, shader_plan, vulkaninfo_text
    devices = list_devices()
    # without a build folder to hold the wrapper nothing can be left out: the plan then keeps every set
    plan = shader_plan(devices if bdir is not None else None, device_features(vulkaninfo_text()),
                       glslc_features(fork) if fork else None)
    record = {"headers": h["version"], "headers_source": h["source"], "headers_include": inc,
              "glslc": glslc[0] if glslc else "?", "driver": driver_line(devices), "shaders": plan}
    exe = GLSLC_CACHE
    if plan["without"]:
        exe = glslc_wrapper(Path(bdir), plan["without"])
    if plan["note"]:
        log(f"Vulkan shaders: {plan['note']}")
    return [f"-DVulkan_INCLUDE_DIR={inc}", f"-DVulkan_GLSLC_EXECUTABLE={exe}"], env, record


# ----------------------------------------------------------------------------- devices


def parse_summary(text: str) -> list[dict]:
    """Physical devices from ``vulkaninfo --summary`` output, in the loader's order (ggml's device indices).

    Returns:
        [{'index': int, 'type': 'PHYSICAL_DEVICE_TYPE_...', 'name', 'driver_name', 'driver_info', 'api'}].
    """
    out: list[dict] = []
    part = text.split("Devices:", 1)[-1]
    for m in re.finditer(r"^GPU(\d+):\s*$((?:\n[ \t]+\S.*)*)", part, re.M):
        kv = dict(re.findall(r"^\s+(\w+)\s*=\s*(.*?)\s*$", m.group(2), re.M))
        out.append({"index": int(m.group(1)), "type": kv.get("deviceType", "?"), "name": kv.get("deviceName", "?"),
                    "driver_name": kv.get("driverName", "?"), "driver_info": kv.get("driverInfo", ""),
                    "api": kv.get("apiVersion", "?")})
    return out


def list_devices(env: dict | None = None, timeout_s: float = 60.0) -> list[dict] | None:
    """This machine's Vulkan devices (:func:`parse_summary` of ``vulkaninfo --summary``); None when vulkaninfo is
    not installed or fails (then nothing is known about the devices)."""
    exe = shutil.which("vulkaninfo", path=(env or os.environ).get("PATH"))
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--summary"], capture_output=True, text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_summary(r.stdout) if r.returncode == 0 else None


def is_software(dev: dict) -> bool:
    """True for a CPU-type Vulkan device (a software driver such as lavapipe)."""
    return dev.get("type") == SOFTWARE_TYPE


def driver_line(devices: list[dict] | None) -> str:
    """'llvmpipe (LLVM 15.0.6, 256 bits): driver llvmpipe, Mesa 22.3.6 (LLVM 15.0.6), Vulkan 1.3.230, software (CPU-type)
    device' per device, joined by '; '; what is unknown when vulkaninfo is not there."""
    if devices is None:
        return "unknown (vulkaninfo not installed: apt-get install vulkan-tools)"
    if not devices:
        return "no Vulkan device"
    return "; ".join(f"{d['name']}: driver {d['driver_name']}" + (f", {d['driver_info']}" if d["driver_info"] else "")
                     + f", Vulkan {d['api']}" + (", software (CPU-type) device" if is_software(d) else "")
                     for d in devices)


def device_env(env: dict, devices: list[dict] | None) -> tuple[dict, str]:
    """The environment a Vulkan build's processes get: with :data:`VISIBLE_ENV` naming the software devices when
    the machine has no GPU-type Vulkan device (ggml ignores CPU-type devices unless told).

    Args:
        env: the environment to start from (not changed). devices: :func:`list_devices`.
    Returns:
        (environment, note for the report: what was set and why, or '' when nothing was).
        A value already set by the user is kept.
    """
    env = dict(env)
    if env.get(VISIBLE_ENV) is not None:
        return env, f"{VISIBLE_ENV}={env[VISIBLE_ENV]} as set by the user"
    if not devices:
        return env, ""
    soft = [d for d in devices if is_software(d)]
    hard = [d for d in devices if not is_software(d)]
    if soft and not hard:
        env[VISIBLE_ENV] = ",".join(str(d["index"]) for d in soft)
        return env, (f"{VISIBLE_ENV}={env[VISIBLE_ENV]} set by the harness: the only Vulkan devices are software "
                     f"(CPU-type: {', '.join(d['name'] for d in soft)}), which ggml ignores unless named")
    return env, ""


def build_has_vulkan(bdir: Path) -> bool:
    """True when a build folder was configured with ggml's Vulkan backend (GGML_VULKAN=ON in its CMakeCache.txt)."""
    f = Path(bdir) / "CMakeCache.txt"
    return f.is_file() and bool(re.search(r"^GGML_VULKAN:BOOL=(ON|1|TRUE|YES)\s*$", f.read_text(errors="replace"),
                                          re.M | re.I))
